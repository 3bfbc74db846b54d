"""DatabricksLink, alone in a test stack per cloud, against placeholder hub values: the NCC and its
rule, the approval wired to the rule, the binding, the egress policy and its binding, the DNS
records pointing at the load balancer, the Unity Catalog connections and catalogs, the variables,
and that no password or credential value reaches the JSON."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import cdktf
import pytest
from cdktf import TerraformStack, TerraformVariable

from tests.helpers import DATABRICKS_OVERRIDE_WAIT_S, aws_hub, azure_hub, load_hubs, mutated, overrides_text
from tunnelhub import spec as S

pytestmark = pytest.mark.synth

# Secret values planted in the environment while synthesizing: none may appear in the JSON.
PLANTED = {
    "TF_VAR_orders_mysql_password": "planted-orders-pw-4417",
    "TF_VAR_erp_password": "planted-erp-pw-9120",
    "TF_VAR_inventory_mysql_password": "planted-inventory-pw-2210",
    "DATABRICKS_TOKEN": "dapi-planted-token-6650",
    "DATABRICKS_CLIENT_SECRET": "planted-client-secret-3381",
    "ARM_CLIENT_SECRET": "planted-arm-secret-7702",
    "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-5519",
}

AZURE_CLASSIC_VNET = (
    "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/dbx-rg/providers/"
    "Microsoft.Network/virtualNetworks/dbx-vnet"
)
DATABRICKS_AZURE = {
    "account_id": "0d2f1a6e-4b7c-4e2a-9c1d-3f5e6a7b8c9d",
    "workspace_id": "9007199254740993",  # 2**53 + 1: a JS number would round it
    "workspace_host": "https://adb-9007199254740993.3.azuredatabricks.net",
    "classic": {"network_id": AZURE_CLASSIC_VNET, "cidrs": ["10.139.0.0/16"]},
    "network_policy": {"mode": "dry_run", "allowed_domains": ["pypi.org", "contoso.openai.azure.com"]},
    "connections": [
        {"route": "orders-mysql", "user": "reader", "password_var": "orders_mysql_password",
         "foreign_catalog": {"name": "orders", "database": "orders"}},
        {"route": "billing-pg", "user_var": "billing_pg_user", "password_var": "billing_pg_password",
         "foreign_catalog": {"name": "billing", "database": "billing"}},
        {"route": "erp-mssql", "name": "erp_sqlserver", "user": "erp_reader", "password_var": "erp_password"},
        {"route": "ledger-ora", "user": "erp_reader", "password_var": "erp_password",
         "foreign_catalog": {"name": "ledger", "database": "LEDGERPDB"}},
    ],
}
AZURE_ROUTES = [
    {"name": "orders-mysql", "kind": "tunnel", "port": 3306, "target": "orders-db.corp.example:3306", "type": "mysql"},
    {"name": "billing-pg", "kind": "tunnel", "port": 5432, "target": "192.168.20.15:5432", "type": "postgresql"},
    {"name": "erp-mssql", "kind": "tunnel", "port": 1433, "target": "erp.corp.example:1433", "type": "sqlserver",
     "domain": "erp.db.example.internal"},
    {"name": "ledger-ora", "kind": "tunnel", "port": 1521, "target": "erp.corp.example:1521", "type": "oracle",
     "domain": "erp.db.example.internal"},
    {"name": "aoai", "kind": "forward", "port": 443, "target": "contoso.openai.azure.com:443"},
]
DATABRICKS_AWS = {
    "account_id": "0d2f1a6e-4b7c-4e2a-9c1d-3f5e6a7b8c9d",
    "workspace_id": "2345678901234567",
    "workspace_host": "https://dbc-2345678901234567.cloud.databricks.com",
    "classic": {"network_id": "vpc-0a1b2c3d4e5f60718", "cidrs": ["10.80.0.0/16"],
                "aws_route_table_ids": ["rtb-0a1b2c3d4e5f60718"]},
    "ncc_name": "use_serverless",
    "network_policy": {"allowed_domains": ["files.pythonhosted.org"]},
    "connections": [{"route": "inventory-mysql", "user": "reader", "password_var": "inventory_mysql_password"}],
}


def azure_spec_hub(**databricks_overrides) -> S.Hub:
    hub = azure_hub(routes=AZURE_ROUTES, databricks={**DATABRICKS_AZURE, **databricks_overrides})
    return load_hubs(hub).hubs[0]


def aws_spec_hub(**databricks_overrides) -> S.Hub:
    return load_hubs(aws_hub(databricks={**DATABRICKS_AWS, **databricks_overrides})).hubs[0]


@dataclass
class Synth:
    hub: S.Hub
    link: object
    json: dict
    text: str

    def resources(self, kind: str) -> dict[str, dict]:
        return self.json.get("resource", {}).get(kind, {})

    def one(self, kind: str) -> tuple[str, dict]:
        items = self.resources(kind)
        assert len(items) == 1, f"expected one {kind}, found {sorted(items)}"
        return next(iter(items.items()))

    def data(self, kind: str) -> tuple[str, dict]:
        items = self.json.get("data", {}).get(kind, {})
        assert len(items) == 1, f"expected one data.{kind}, found {sorted(items)}"
        return next(iter(items.items()))


def synth_link(hub: S.Hub, *, link_hub: S.Hub | None = None, **props) -> Synth:
    """A stack holding the providers a HubStack creates and a DatabricksLink against placeholders."""
    from tunnelhub.app import _approval_providers, _databricks_providers
    from tunnelhub.constructs.databricks_link import (
        AwsEndpointTarget,
        AzureEndpointTarget,
        DatabricksLink,
        DatabricksLinkProps,
    )

    stack = TerraformStack(cdktf.Testing.app(), "test")
    if hub.cloud == "azure":
        from cdktf_cdktf_provider_azurerm.provider import AzurermProvider, AzurermProviderFeatures

        AzurermProvider(stack, "azurerm", features=[AzurermProviderFeatures()])
    else:
        from cdktf_cdktf_provider_aws.provider import AwsProvider

        AwsProvider(stack, "aws", region=hub.region)
    account, workspace = _databricks_providers(stack, hub)
    time, azapi = _approval_providers(stack, hub)

    def placeholder(name: str) -> str:
        return TerraformVariable(stack, name, type="string").string_value

    if hub.cloud == "azure":
        target = AzureEndpointTarget(private_link_service_id=placeholder("pls_id"),
                                     lb_frontend_ip=placeholder("lb_frontend_ip"),
                                     resource_group_name=placeholder("hub_resource_group"))
    else:
        target = AwsEndpointTarget(endpoint_service_id=placeholder("endpoint_service_id"),
                                   endpoint_service_name=placeholder("endpoint_service_name"),
                                   nlb_dns_name=placeholder("nlb_dns_name"),
                                   nlb_zone_id=placeholder("nlb_zone_id"))
    props = {"time_provider": time, "azapi_provider": azapi, "target": target, **props}
    link = DatabricksLink(stack, "databricks", DatabricksLinkProps(
        hub=link_hub if link_hub is not None else hub, account_provider=account, workspace_provider=workspace, **props))
    text = cdktf.Testing.synth(stack)
    return Synth(hub, link, json.loads(text), text)


@pytest.fixture(scope="module")
def planted_env():
    saved = {k: os.environ.get(k) for k in PLANTED}
    os.environ.update(PLANTED)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def azure(planted_env) -> Synth:
    return synth_link(azure_spec_hub())


@pytest.fixture(scope="module")
def aws(planted_env) -> Synth:
    return synth_link(aws_spec_hub())


@pytest.fixture(params=["azure", "aws"])
def both(request, azure, aws) -> Synth:
    return {"azure": azure, "aws": aws}[request.param]


def ref(kind: str, name: str, attr: str) -> str:
    return f"${{{kind}.{name}.{attr}}}"


# -- NCC, rule, binding -----------------------------------------------------------------------


def test_ncc_is_created_in_the_hub_region_on_the_account_provider(both):
    _, ncc = both.one("databricks_mws_network_connectivity_config")
    assert ncc["region"] == both.hub.region
    assert ncc["name"] == both.hub.ncc_name
    assert ncc["provider"] == "databricks.account"


def test_azure_rule_targets_the_pls_with_the_route_domains_once_each(azure):
    ncc_name, _ = azure.one("databricks_mws_network_connectivity_config")
    _, rule = azure.one("databricks_mws_ncc_private_endpoint_rule")
    assert rule["resource_id"] == "${var.pls_id}"
    assert rule["domain_names"] == [
        "orders-mysql.weu.tunnelhub.internal",
        "billing-pg.weu.tunnelhub.internal",
        "erp.db.example.internal",  # two routes share it: listed once
        "contoso.openai.azure.com",
    ]
    assert "endpoint_service" not in rule and "group_id" not in rule
    assert rule["network_connectivity_config_id"] == ref(
        "databricks_mws_network_connectivity_config", ncc_name, "network_connectivity_config_id")
    assert rule["provider"] == "databricks.account"


def test_aws_rule_targets_the_endpoint_service_with_the_route_domains(aws):
    _, rule = aws.one("databricks_mws_ncc_private_endpoint_rule")
    assert rule["endpoint_service"] == "${var.endpoint_service_name}"
    assert rule["domain_names"] == ["inventory-mysql.use.tunnelhub.internal", "contoso-aoai.openai.azure.com"]
    assert "resource_id" not in rule and "resource_names" not in rule


def test_ncc_binding_names_the_workspace_exactly(both):
    ncc_name, _ = both.one("databricks_mws_network_connectivity_config")
    _, binding = both.one("databricks_mws_ncc_binding")
    assert binding["workspace_id"] == both.hub.databricks.workspace_id  # a string: no float rounding
    assert binding["network_connectivity_config_id"] == ref(
        "databricks_mws_network_connectivity_config", ncc_name, "network_connectivity_config_id")
    assert binding["provider"] == "databricks.account"
    assert '"workspace_id": 9007199254740992' not in both.text


# -- approval ---------------------------------------------------------------------------------


def check_wait_follows_rule(s: Synth) -> tuple[str, str]:
    rule_name, _ = s.one("databricks_mws_ncc_private_endpoint_rule")
    wait_name, wait = s.one("time_sleep")
    assert wait["create_duration"] == f"{S.DEFAULT_APPROVAL_WAIT_S}s" == "600s"
    assert wait["triggers"] == {"rule_id": ref("databricks_mws_ncc_private_endpoint_rule", rule_name, "rule_id")}
    assert wait["depends_on"] == [f"databricks_mws_ncc_private_endpoint_rule.{rule_name}"]
    assert wait["provider"] == "time"
    return rule_name, wait_name


def local_named(s: Synth, reference: str) -> tuple[str, str]:
    m = re.fullmatch(r"\$\{local\.([A-Za-z0-9_-]+)\}", reference)
    assert m, f"{reference} is not a local reference"
    return m[1], s.json["locals"][m[1]]


def test_azure_approval_approves_the_pls_connection_of_the_rules_endpoint(azure):
    rule_name, wait_name = check_wait_follows_rule(azure)
    data_name, listing = azure.data("azurerm_private_link_service_endpoint_connections")
    assert listing["service_id"] == "${var.pls_id}"
    assert listing["resource_group_name"] == "${var.hub_resource_group}"
    assert listing["depends_on"] == [f"time_sleep.{wait_name}"]

    _, approval = azure.one("azapi_update_resource")
    assert approval["provider"] == "azapi"
    assert approval["type"].startswith("Microsoft.Network/privateLinkServices/privateEndpointConnections@")
    assert approval["body"]["properties"]["privateLinkServiceConnectionState"]["status"] == "Approved"
    local_name, expression = local_named(azure, approval["resource_id"])
    # the connection picked is the one whose private endpoint is the rule's endpoint
    assert f"data.azurerm_private_link_service_endpoint_connections.{data_name}.private_endpoint_connections" in expression
    assert f"c.private_endpoint_name == databricks_mws_ncc_private_endpoint_rule.{rule_name}.endpoint_name" in expression
    assert "c.connection_id" in expression
    (precondition,) = approval["lifecycle"]["precondition"]
    assert precondition["condition"] == f'${{local.{local_name} != ""}}'
    assert "az network private-link-service connection update" in precondition["error_message"]
    assert "--connection-status Approved" in precondition["error_message"]


def test_aws_accepter_accepts_the_rules_vpc_endpoint_on_the_endpoint_service(aws):
    rule_name, wait_name = check_wait_follows_rule(aws)
    ncc_name, _ = aws.one("databricks_mws_network_connectivity_config")
    data_name, state = aws.data("databricks_mws_network_connectivity_config")
    assert state["name"] == ref("databricks_mws_network_connectivity_config", ncc_name, "name")
    assert state["depends_on"] == [f"time_sleep.{wait_name}"]
    assert state["provider"] == "databricks.account"

    _, accepter = aws.one("aws_vpc_endpoint_connection_accepter")
    assert accepter["vpc_endpoint_service_id"] == "${var.endpoint_service_id}"
    local_name, expression = local_named(aws, accepter["vpc_endpoint_id"])
    rule = f"databricks_mws_ncc_private_endpoint_rule.{rule_name}"
    assert expression.startswith(f"${{try(coalesce({rule}.vpc_endpoint_id, ")  # the rule's own id first
    assert f"data.databricks_mws_network_connectivity_config.{data_name}.egress_config[0].target_rules[0]" \
           ".aws_private_endpoint_rules" in expression
    assert f"r.rule_id == {rule}.rule_id" in expression
    (precondition,) = accepter["lifecycle"]["precondition"]
    assert precondition["condition"] == f'${{local.{local_name} != ""}}'
    assert "aws ec2 accept-vpc-endpoint-connections --service-id ${var.endpoint_service_id}" in precondition["error_message"]


def test_approval_providers_are_pinned_in_required_providers(azure, aws):
    from tunnelhub.providers import PROVIDER_VERSIONS

    azapi = {"source": "Azure/azapi", "version": PROVIDER_VERSIONS["azapi"]}
    assert azure.json["terraform"]["required_providers"]["azapi"] == azapi
    for s in (azure, aws):
        time = {"source": "hashicorp/time", "version": PROVIDER_VERSIONS["time"]}
        assert s.json["terraform"]["required_providers"]["time"] == time
    assert "azapi" not in aws.json["terraform"]["required_providers"]


def test_approval_wait_is_configurable(planted_env):
    s = synth_link(aws_spec_hub(), approval_wait_s=0)
    assert s.one("time_sleep")[1]["create_duration"] == "0s"
    s = synth_link(aws_spec_hub(approval_wait_s=45))  # the spec's value when the props give none
    assert s.one("time_sleep")[1]["create_duration"] == "45s"


def test_the_app_takes_the_approval_wait_from_the_spec(synth_spec):
    """hashicorp/time ``time_sleep.create_duration`` is a duration string ("900s"). The app builds the
    link from ``databricks.approval_wait_s`` on both clouds (default 600 s, spec.DEFAULT_APPROVAL_WAIT_S:
    databricks 1.99.0 returns the rule while CREATING, terraform-provider-databricks PR #5743 polls
    that state for up to 30 minutes; 60 s usually ended before the endpoint existed)."""
    out = synth_spec(text=overrides_text())
    for stack in ("ovz-azure", "ova-aws"):
        (wait,) = out.stack(stack)["resource"]["time_sleep"].values()
        assert wait["create_duration"] == f"{DATABRICKS_OVERRIDE_WAIT_S}s" == "900s"


def test_ncc_and_rule_prevent_destroy_unless_protect_is_false(both, planted_env):
    """A destroyed or replaced rule removes the endpoint serverless compute uses (a new one needs a
    new approval); a replaced NCC must be bound again (10-15 minutes to propagate). Terraform's
    ``prevent_destroy`` rejects any plan that would destroy them (developer.hashicorp.com/terraform/
    language/meta-arguments/lifecycle). Routine changes stay possible: ``domain_names`` is updated in
    place in databricks 1.99.0 (mws/resource_mws_ncc_private_endpoint_rule.go: only endpoint_service,
    group_id, resource_id and the NCC id are ForceNew). The binding is not guarded: its delete is a
    no-op in 1.99.0 (mws/resource_mws_ncc_binding.go)."""
    for kind in ("databricks_mws_network_connectivity_config", "databricks_mws_ncc_private_endpoint_rule"):
        assert both.one(kind)[1]["lifecycle"] == {"prevent_destroy": True}
    assert "lifecycle" not in both.one("databricks_mws_ncc_binding")[1]
    unprotected = load_hubs({**(azure_hub(routes=AZURE_ROUTES) if both.hub.cloud == "azure" else aws_hub()),
                             "protect": False,
                             "databricks": DATABRICKS_AZURE if both.hub.cloud == "azure" else DATABRICKS_AWS}).hubs[0]
    s = synth_link(unprotected)
    for kind in ("databricks_mws_network_connectivity_config", "databricks_mws_ncc_private_endpoint_rule"):
        assert "lifecycle" not in s.one(kind)[1]


# -- egress policy ----------------------------------------------------------------------------


def test_policy_restricts_egress_to_forward_domains_and_extras_and_is_bound(azure, aws):
    for s, mode, name, allowed in (
        (azure, "DRY_RUN", "weu-egress", ["contoso.openai.azure.com", "pypi.org"]),
        (aws, "ENFORCED", "use-egress", ["contoso-aoai.openai.azure.com", "files.pythonhosted.org"]),
    ):
        policy_name, policy = s.one("databricks_account_network_policy")
        access = policy["egress"]["network_access"]
        assert policy["network_policy_id"] == name
        assert access["restriction_mode"] == "RESTRICTED_ACCESS"
        assert access["policy_enforcement"] == {"enforcement_mode": mode}
        assert [d["destination"] for d in access["allowed_internet_destinations"]] == allowed
        assert {d["internet_destination_type"] for d in access["allowed_internet_destinations"]} == {"DNS_NAME"}
        _, option = s.one("databricks_workspace_network_option")
        assert option["network_policy_id"] == ref("databricks_account_network_policy", policy_name, "network_policy_id")
        assert option["workspace_id"] == s.hub.databricks.workspace_id
        assert option["provider"] == policy["provider"] == "databricks.account"


# -- DNS --------------------------------------------------------------------------------------


def test_azure_dns_has_one_zone_per_domain_pointing_at_the_lb_and_linked_to_classic(azure):
    zones = azure.resources("azurerm_private_dns_zone")
    by_name = {z["name"]: key for key, z in zones.items()}
    assert sorted(by_name) == sorted(azure.link.domain_names)
    assert "openai.azure.com" not in by_name  # the forward name only, never its parent zone
    records = azure.resources("azurerm_private_dns_a_record").values()
    links = azure.resources("azurerm_private_dns_zone_virtual_network_link").values()
    for key in by_name.values():
        zone_ref = ref("azurerm_private_dns_zone", key, "name")
        (record,) = [r for r in records if r["zone_name"] == zone_ref]
        assert record["name"] == "@" and record["records"] == ["${var.lb_frontend_ip}"]
        (link,) = [lk for lk in links if lk["private_dns_zone_name"] == zone_ref]
        assert link["virtual_network_id"] == AZURE_CLASSIC_VNET
        assert link["registration_enabled"] is False
        assert zones[key]["resource_group_name"] == "${var.hub_resource_group}"


def test_aws_dns_has_one_private_zone_per_domain_on_the_classic_vpc_aliasing_the_nlb(aws):
    zones = aws.resources("aws_route53_zone")
    by_name = {z["name"]: key for key, z in zones.items()}
    assert sorted(by_name) == sorted(aws.link.domain_names)
    records = aws.resources("aws_route53_record").values()
    for domain, key in by_name.items():
        assert zones[key]["vpc"] == [{"vpc_id": "vpc-0a1b2c3d4e5f60718"}]  # never the hub VPC
        (record,) = [r for r in records if r["zone_id"] == ref("aws_route53_zone", key, "zone_id")]
        assert record["name"] == domain and record["type"] == "A"
        assert record["alias"] == {"name": "${var.nlb_dns_name}", "zone_id": "${var.nlb_zone_id}",
                                   "evaluate_target_health": False}
    assert not aws.resources("aws_route53_zone_association")


@pytest.mark.parametrize("cloud, classic", [
    ("azure", {"network_id": AZURE_CLASSIC_VNET, "cidrs": ["10.139.0.0/16"], "remote_peering_enabled": False}),
    ("aws", {"network_id": "vpc-0a1b2c3d4e5f60718", "cidrs": ["10.80.0.0/16"], "remote_peering_enabled": False}),
    ("aws", {"network_id": "vpc-0a1b2c3d4e5f60718", "cidrs": ["10.80.0.0/16"], "aws_account_id": "123456789012",
             "remote_peering_enabled": False}),  # another account: the spec requires the flag off
    ("azure", None),
])
def test_no_dns_zones_where_tunnelhub_has_no_rights_on_the_classic_network(planted_env, cloud, classic):
    hub = (azure_spec_hub if cloud == "azure" else aws_spec_hub)(classic=classic)
    s = synth_link(hub)
    for kind in ("azurerm_private_dns_zone", "azurerm_private_dns_zone_virtual_network_link", "aws_route53_zone",
                 "aws_route53_record"):
        assert not s.resources(kind)
    assert s.link.dns_zone_names == []
    assert s.resources("databricks_mws_ncc_private_endpoint_rule")  # serverless does not depend on it


# -- Unity Catalog ----------------------------------------------------------------------------


def test_one_connection_per_database_route_with_type_host_and_port(azure):
    connections = {c["name"]: c for c in azure.resources("databricks_connection").values()}
    assert {n: (c["connection_type"], c["options"]["host"], c["options"]["port"]) for n, c in connections.items()} == {
        "orders_mysql": ("MYSQL", "orders-mysql.weu.tunnelhub.internal", "3306"),
        "billing_pg": ("POSTGRESQL", "billing-pg.weu.tunnelhub.internal", "5432"),
        "erp_sqlserver": ("SQLSERVER", "erp.db.example.internal", "1433"),
        "ledger_ora": ("ORACLE", "erp.db.example.internal", "1521"),
    }
    assert connections["orders_mysql"]["options"]["user"] == "reader"
    assert connections["billing_pg"]["options"]["user"] == "${var.billing_pg_user}"
    assert connections["erp_sqlserver"]["options"]["password"] == "${var.erp_password}"
    assert connections["ledger_ora"]["options"]["password"] == "${var.erp_password}"
    assert {c["provider"] for c in connections.values()} == {"databricks.workspace"}
    assert azure.link.connection_names == {"orders-mysql": "orders_mysql", "billing-pg": "billing_pg",
                                           "erp-mssql": "erp_sqlserver", "ledger-ora": "ledger_ora"}


def test_foreign_catalogs_use_the_option_of_their_database_type(azure):
    connections = {key: c["name"] for key, c in azure.resources("databricks_connection").items()}
    catalogs = {c["name"]: c for c in azure.resources("databricks_catalog").values()}
    assert sorted(catalogs) == ["billing", "ledger", "orders"]
    assert catalogs["billing"].get("options") == {"database": "billing"}
    assert catalogs["ledger"].get("options") == {"service_name": "LEDGERPDB"}
    assert "options" not in catalogs["orders"]  # MySQL: the catalog mirrors every database
    for name, connection in (("billing", "billing_pg"), ("ledger", "ledger_ora"), ("orders", "orders_mysql")):
        (key,) = [k for k, n in connections.items() if n == connection]
        assert catalogs[name]["connection_name"] == ref("databricks_connection", key, "name")
        assert catalogs[name]["provider"] == "databricks.workspace"


def test_variables_keep_their_spec_names_and_passwords_are_sensitive(azure):
    variables = azure.json["variable"]
    assert azure.link.password_variables == ["orders_mysql_password", "billing_pg_password", "erp_password"]
    assert azure.link.user_variables == ["billing_pg_user"]
    for name in azure.link.password_variables:
        assert variables[name]["sensitive"] is True and variables[name]["nullable"] is False
        assert "default" not in variables[name]
        assert variables[name]["validation"][0]["condition"] == f"${{length(var.{name}) > 0}}"
    assert variables["billing_pg_user"]["sensitive"] is False


def test_no_password_or_credential_value_reaches_the_json(azure, aws):
    for s in (azure, aws):
        for value in PLANTED.values():
            assert value not in s.text
        for connection in s.resources("databricks_connection").values():
            password = connection["options"]["password"]
            assert re.fullmatch(r"\$\{var\.([A-Za-z0-9_-]+)\}", password), password
            assert s.json["variable"][password[6:-1]]["sensitive"] is True
        providers = s.json["provider"]["databricks"]
        assert {frozenset(p) for p in providers} == {frozenset({"alias", "host", "account_id"}),
                                                     frozenset({"alias", "host"})}
        for key in ("token", "client_secret", "password", "azure_client_secret"):
            assert all(key not in p for p in providers)
        assert s.json["provider"]["time"] == [{}]
    assert azure.json["provider"]["azapi"] == [{}]


# -- options off ------------------------------------------------------------------------------


def test_serverless_disabled_creates_no_ncc_rule_approval_or_binding(planted_env):
    s = synth_link(azure_spec_hub(serverless_enabled=False), time_provider=None, azapi_provider=None)
    for kind in ("databricks_mws_network_connectivity_config", "databricks_mws_ncc_private_endpoint_rule",
                 "databricks_mws_ncc_binding", "azapi_update_resource", "time_sleep"):
        assert not s.resources(kind)
    assert "data" not in s.json
    assert s.link.ncc_id is None and s.link.approval is None
    assert s.resources("databricks_account_network_policy")  # the policy still applies
    assert len(s.resources("databricks_connection")) == 4
    assert len(s.resources("azurerm_private_dns_zone")) == 4


def test_without_policy_or_connections_nothing_of_them_is_created(planted_env):
    s = synth_link(aws_spec_hub(network_policy=None, connections=[]))
    for kind in ("databricks_account_network_policy", "databricks_workspace_network_option",
                 "databricks_connection", "databricks_catalog"):
        assert not s.resources(kind)
    assert "inventory_mysql_password" not in s.json.get("variable", {})
    assert s.link.network_policy_id is None


# -- errors -----------------------------------------------------------------------------------


def test_a_policy_name_databricks_rejects_is_a_spec_error(planted_env):
    with pytest.raises(S.SpecError, match=r"databricks\.network_policy\.name = 'weu egress policy': Databricks "
                                          r"network policy ids are 1-32 letters"):
        synth_link(azure_spec_hub(network_policy={"name": "weu egress policy"}))


def test_a_user_variable_that_is_also_a_password_variable_is_a_spec_error(planted_env):
    connections = [*DATABRICKS_AZURE["connections"][:1],
                   {"route": "billing-pg", "user_var": "orders_mysql_password", "password_var": "billing_pg_password"}]
    with pytest.raises(S.SpecError, match=r"connections\[1\]\.user_var = 'orders_mysql_password': this variable also "
                                          r"holds a password"):
        synth_link(azure_spec_hub(connections=connections))


def test_duplicate_foreign_catalog_names_are_a_spec_error(planted_env):
    connections = mutated({"c": DATABRICKS_AZURE["connections"]},
                          lambda d: d["c"][1]["foreign_catalog"].update(name="orders"))["c"]
    with pytest.raises(S.SpecError, match=r"connections\[1\]\.foreign_catalog\.name = 'orders': foreign catalog names "
                                          r"must be unique; connections\[0\] already uses it"):
        synth_link(azure_spec_hub(connections=connections))


def test_wiring_mistakes_are_type_errors(planted_env):
    from tunnelhub.constructs.databricks_link import AwsEndpointTarget

    aws_target = AwsEndpointTarget(endpoint_service_id="s", endpoint_service_name="n", nlb_dns_name="d",
                                   nlb_zone_id="z")
    with pytest.raises(TypeError, match="its target must be an AzureEndpointTarget, not AwsEndpointTarget"):
        synth_link(azure_spec_hub(), target=aws_target)
    with pytest.raises(TypeError, match="needs azapi_provider"):
        synth_link(azure_spec_hub(), azapi_provider=None)
    with pytest.raises(TypeError, match="needs time_provider"):
        synth_link(aws_spec_hub(), time_provider=None)
    with pytest.raises(TypeError, match="has no databricks block"):
        synth_link(aws_spec_hub(), link_hub=load_hubs(aws_hub()).hubs[0])


# -- the app's wiring helper ------------------------------------------------------------------


def test_add_databricks_link_wires_the_stacks_providers(monkeypatch, planted_env):
    from tunnelhub import app as app_module
    from tunnelhub.constructs.databricks_link import AzureEndpointTarget

    monkeypatch.setattr(app_module, "_add_hub_constructs", lambda stack, hub: None)  # placeholders instead
    hub = azure_spec_hub()
    stack = app_module.HubStack(cdktf.Testing.app(), hub)
    link = app_module.add_databricks_link(stack, hub, AzureEndpointTarget(
        private_link_service_id="/subscriptions/x/pls", lb_frontend_ip="10.60.0.4", resource_group_name="weu-rg"))
    out = json.loads(cdktf.Testing.synth(stack))
    assert link.node.id == "databricks"
    assert {p["alias"] for p in out["provider"]["databricks"]} == {"account", "workspace"}
    assert set(out["terraform"]["required_providers"]) >= {"azapi", "time", "databricks", "azurerm"}
    records = out["resource"]["azurerm_private_dns_a_record"].values()
    assert {tuple(r["records"]) for r in records} == {("10.60.0.4",)}


# -- the hand-written Terraform expressions ---------------------------------------------------


def interpolations(value) -> list[str]:
    """Every ``${...}`` expression in a JSON value (strings scanned with brace and quote matching)."""
    found: list[str] = []
    if isinstance(value, dict):
        for v in value.values():
            found += interpolations(v)
    elif isinstance(value, list):
        for v in value:
            found += interpolations(v)
    elif isinstance(value, str):
        i = value.find("${")
        while i != -1:
            depth, j, quoted = 0, i + 2, False
            while j < len(value):
                ch = value[j]
                if quoted:
                    if ch == "\\":
                        j += 1
                    elif ch == '"':
                        quoted = False
                elif ch == '"':
                    quoted = True
                elif ch == "{":
                    depth += 1
                elif ch == "}":
                    if depth == 0:
                        break
                    depth -= 1
                j += 1
            found.append(value[i + 2:j])
            i = value.find("${", j)
    return found


REFERENCE = re.compile(
    r"(?<![\w.])(data\.[a-z0-9_]+\.[\w-]+|var\.[\w-]+|local\.[\w-]+|(?:databricks|azurerm|aws|time|azapi)_[a-z0-9_]+\.[\w-]+)"
)


def test_every_expression_parses_and_references_objects_of_the_stack(azure, aws):
    hcl2 = pytest.importorskip("hcl2")
    for s in (azure, aws):
        declared = {f"{kind}.{name}" for kind, items in s.json["resource"].items() for name in items}
        declared |= {f"data.{kind}.{name}" for kind, items in s.json.get("data", {}).items() for name in items}
        declared |= {f"var.{name}" for name in s.json["variable"]}
        declared |= {f"local.{name}" for name in s.json.get("locals", {})}
        expressions = interpolations({k: v for k, v in s.json.items() if k != "terraform"})
        assert len(expressions) > 20
        for expression in expressions:
            hcl2.loads(f"x = {expression}\n")  # raises on a syntax error
            for address in REFERENCE.findall(expression):
                assert address in declared, f"{address} in {expression!r} is not declared in the stack"
