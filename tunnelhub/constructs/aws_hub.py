"""The AWS hub: proxies in an Auto Scaling group with stable slots, behind an internal NLB and a
VPC endpoint service (docs/aws.md is the operator's view, docs/aws-slots.md the slot Lambda's).

What it builds from one resolved hub spec:

- the network (:mod:`tunnelhub.constructs.aws_network`): a new VPC or the spec's existing one;
- ``proxies.count`` **slots**: slot *n* is the Elastic IP tagged ``tunnelhub:pool=<hub>`` and
  ``tunnelhub:slot=<n>`` plus the fixed private address ``hub.aws_addresses().slot_private_ips[n]``
  in its zone's proxy subnet (a secondary IP the slot Lambda assigns). Every AWS hub has both:
  the NLB reaches a proxy at its slot's private address; ``onprem.private_circuit`` only decides
  what the tunnel host dials (the private addresses, or the Elastic IPs);
- the slot Lambda (:mod:`tunnelhub.constructs.aws_slot_function`) and the group's launch hook;
- the hub SSH host key (tls provider), kept in an SSM SecureString under a key of its own that
  only the proxies' role may decrypt through SSM;
- the launch template (the static bootstrap cloud-init: it changes with the machine, never with a
  route or a key) and the Auto Scaling group (one instance per slot);
- the files bucket with the hub configuration document (routes, tunnel keys, probe settings),
  which the proxies' reconcilers poll and apply live;
- the internal NLB: per route a TCP listener and an ``ip`` target group holding the slots'
  private addresses, health-checked on the proxies' health port at ``/routes/<route>``; plus the
  instance-health target group (``/healthz``) that the group's ELB health check uses;
- the VPC endpoint service (acceptance required) for Databricks serverless;
- the VPC peering to the Databricks classic VPC and its routes (see ``aws_network``);
- with ``monitoring.alerts`` (default): per route target group a down and a degraded alarm on
  ``HealthyHostCount``, an alarm on the launches the slot Lambda abandons (a metric filter on its
  log), and the SNS topic with the spec's email / https subscriptions;
- security groups: SSH only from the on-prem CIDRs, route and health ports only from the NLB
  (the health port also from ``monitoring.scrape_cidrs``); the NLB's route ports only from the
  Databricks classic CIDRs (PrivateLink traffic is not filtered by the NLB's security group: the
  endpoint service's acceptance is its gate).

**Why the route target groups are not attached to the group.** With ``health_check_type =
"ELB"`` the Auto Scaling group replaces an instance as soon as any of its attached target groups
reports it unhealthy. A route's health is "can this proxy reach the on-prem database now": during
a database outage every proxy answers 503 on that route, and attached route target groups would
make the group replace every proxy, again and again, while nothing is wrong with them. So the
group's only target group checks ``GET /healthz`` (the health daemon itself, independent of
routes), and the route target groups hold the slots' fixed private addresses (``target_type =
"ip"``), registered once by Terraform: a replaced proxy that takes the slot takes its address,
and with it its place in every route.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from cdktf import ITerraformDependable, TerraformResourceLifecycle, Token
from cdktf_cdktf_provider_aws.autoscaling_group import (
    AutoscalingGroup,
    AutoscalingGroupInitialLifecycleHook,
    AutoscalingGroupInstanceRefresh,
    AutoscalingGroupInstanceRefreshPreferences,
    AutoscalingGroupLaunchTemplate,
    AutoscalingGroupTag,
)
from cdktf_cdktf_provider_aws.cloudwatch_log_metric_filter import (
    CloudwatchLogMetricFilter,
    CloudwatchLogMetricFilterMetricTransformation,
)
from cdktf_cdktf_provider_aws.cloudwatch_metric_alarm import CloudwatchMetricAlarm
from cdktf_cdktf_provider_aws.data_aws_ami import DataAwsAmi, DataAwsAmiFilter
from cdktf_cdktf_provider_aws.data_aws_caller_identity import DataAwsCallerIdentity
from cdktf_cdktf_provider_aws.data_aws_iam_policy_document import (
    DataAwsIamPolicyDocument,
    DataAwsIamPolicyDocumentStatement,
    DataAwsIamPolicyDocumentStatementCondition,
    DataAwsIamPolicyDocumentStatementPrincipals,
)
from cdktf_cdktf_provider_aws.data_aws_partition import DataAwsPartition
from cdktf_cdktf_provider_aws.eip import Eip
from cdktf_cdktf_provider_aws.iam_instance_profile import IamInstanceProfile
from cdktf_cdktf_provider_aws.iam_role import IamRole
from cdktf_cdktf_provider_aws.iam_role_policy import IamRolePolicy
from cdktf_cdktf_provider_aws.kms_alias import KmsAlias
from cdktf_cdktf_provider_aws.kms_key import KmsKey
from cdktf_cdktf_provider_aws.launch_template import (
    LaunchTemplate,
    LaunchTemplateBlockDeviceMappings,
    LaunchTemplateBlockDeviceMappingsEbs,
    LaunchTemplateIamInstanceProfile,
    LaunchTemplateMetadataOptions,
    LaunchTemplateMonitoring,
    LaunchTemplateNetworkInterfaces,
    LaunchTemplateTagSpecifications,
)
from cdktf_cdktf_provider_aws.lb import Lb
from cdktf_cdktf_provider_aws.lb_listener import LbListener, LbListenerDefaultAction
from cdktf_cdktf_provider_aws.lb_target_group import LbTargetGroup, LbTargetGroupHealthCheck
from cdktf_cdktf_provider_aws.lb_target_group_attachment import LbTargetGroupAttachment
from cdktf_cdktf_provider_aws.security_group import SecurityGroup
from cdktf_cdktf_provider_aws.sns_topic import SnsTopic
from cdktf_cdktf_provider_aws.sns_topic_subscription import SnsTopicSubscription
from cdktf_cdktf_provider_aws.ssm_parameter import SsmParameter
from cdktf_cdktf_provider_aws.vpc_endpoint_service import VpcEndpointService
from cdktf_cdktf_provider_aws.vpc_security_group_egress_rule import VpcSecurityGroupEgressRule
from cdktf_cdktf_provider_aws.vpc_security_group_ingress_rule import VpcSecurityGroupIngressRule
from cdktf_cdktf_provider_tls.private_key import PrivateKey
from constructs import Construct

from tunnelhub import spec as S
from tunnelhub.constructs.alerting import ABANDONED_METRIC, ABANDONED_PERIOD_S, METRIC_GRAIN_S, METRIC_NAMESPACE, alert_timing
from tunnelhub.constructs.aws_files_bucket import FilesBucket, FilesBucketProps
from tunnelhub.constructs.aws_network import AwsNetwork, AwsNetworkProps
from tunnelhub.constructs.protect import protected
from tunnelhub.constructs.aws_slot_function import SlotFunction, SlotFunctionProps
from tunnelhub.constructs.slot_lambda.handler import (
    DEFAULT_POOL_TAG_KEY,
    DEFAULT_SLOT_TAG_KEY,
    SlotAddress,
    encode_slot_private_ips,
)
from tunnelhub.userdata import (
    AWS_SLOT_ADDRESSES_TAG,
    AWS_SLOT_COUNT_TAG,
    USER_DATA_LIMIT_BYTES,
    HubDocument,
    UserData,
    files_bucket_name,
    host_key_parameter_name,
    render_document,
)

UBUNTU_OWNER = "099720109477"  # Canonical
UBUNTU_NAME = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-{arch}-server-*"
DATABRICKS_SERVERLESS_ROLE = "arn:aws:iam::565502421330:role/private-connectivity-role-{region}"
LIFECYCLE_HOOK_NAME = "tunnelhub-slot"
LIFECYCLE_HEARTBEAT_S = 600  # covers Lambda's ~3 min of async retries (docs/aws-slots.md)
INSTANCE_HEALTH_PATH = "/healthz"
INSTANCE_UNHEALTHY_THRESHOLD = 10  # replacing a proxy costs a boot: only after 10 failed checks in a row
HEALTH_CHECK_TIMEOUT_S = 3  # the health daemon answers from its cache in well under a millisecond
HEALTH_CHECK_GRACE_S = 900  # slot wait + package install + host key, with room to spare
DEREGISTRATION_DELAY_S = 10
ROOT_VOLUME_GIB = 16

PROXY_EGRESS_PORTS = (80, 443)  # packages (the Ubuntu archive is plain HTTP), AWS APIs, S3
# Instance tags visible in instance metadata (instance_metadata_tags = "enabled") may use only
# these characters; EC2 refuses to launch an instance with another tag key.
_GRAVITON_RE = re.compile(r"^[a-z]+[0-9]+[a-z-]*g[a-z-]*\.")


@dataclass(frozen=True, kw_only=True)
class AwsHubProps:
    """What :class:`AwsHub` builds from."""

    hub: S.Hub
    """The resolved hub spec; must be an AWS hub."""
    user_data: UserData
    """The proxies' bootstrap cloud-init (``render_cloud_init(hub, None)``): its payload goes to the
    launch template, its ``s3_objects`` (when it has any) to the hub's files bucket."""
    document: HubDocument | None = None
    """The hub configuration document, uploaded to the files bucket and applied live by the
    proxies (default: ``render_document(hub)``)."""

    def __post_init__(self) -> None:
        hub = self.hub
        if hub.cloud != "aws":  # the spec validates every rule of an AWS hub at load time
            raise S.SpecError([S.SpecIssue(("cloud",), "AwsHub builds aws hubs only", hub.cloud, hub.name)], source=None)
        size, limit = len(base64.b64decode(self.user_data.base64)), USER_DATA_LIMIT_BYTES["aws"]
        if not 0 < size <= limit:
            raise ValueError(
                f"the proxies' user data is {size} bytes; EC2 takes 1-{limit}: render it with "
                "render_cloud_init(hub, None), which compresses it or moves files to the hub's bucket to fit"
            )


def ubuntu_architecture(instance_type: str) -> str:
    """``arm64`` for Graviton instance types (a ``g`` among the family's attributes: t4g, c7gn,
    im4gn), ``amd64`` for the rest (t3, m6i, g4dn)."""
    return "arm64" if _GRAVITON_RE.match(instance_type) else "amd64"


def allowed_endpoint_principals(hub: S.Hub) -> list[str]:
    """The principals allowed to connect to the endpoint service (Databricks serverless by default)."""
    if hub.aws is not None and hub.aws.endpoint_allowed_principals is not None:
        return list(hub.aws.endpoint_allowed_principals)
    return [DATABRICKS_SERVERLESS_ROLE.format(region=hub.region)]


class AwsHub(Construct):
    """One AWS hub (see the module docstring). Uses the stack's aws and tls providers.

    Read-only attributes (tokens resolve at apply time):

    - ``vpc_id``; ``proxy_subnet_ids`` and ``nlb_subnet_ids`` (one per zone);
      ``nlb_route_table_ids`` (where the peering to Databricks classic adds its routes; for an
      existing VPC, ``existing_vpc.nlb_route_table_ids``); ``classic_peering_id`` (the peering to
      the Databricks classic VPC, or None without ``databricks.classic``).
    - ``nlb_arn``, ``nlb_dns_name``, ``nlb_zone_id``, ``nlb_security_group_id``.
    - ``endpoint_service_id``, ``endpoint_service_name``.
    - ``proxy_security_group_id``; ``asg_name``; ``lifecycle_hook_name``.
    - ``slot_public_ips``: the slots' Elastic IPs, by slot. ``slot_private_ips``: the slots'
      fixed private addresses, by slot (text). ``tunnel_endpoints``: what the tunnel host dials,
      by slot (the private addresses with ``onprem.private_circuit``, else the Elastic IPs).
    - ``egress_public_ips``: the addresses the proxies reach the internet from (forward routes'
      allow-lists): the slot Elastic IPs, or with ``egress: nat_gateway`` the NAT gateways' (empty
      in an existing VPC, whose NAT is its owner's).
    - ``host_public_key``: the hub's SSH host public key (OpenSSH format).
    - ``host_key_parameter_name``: the SSM parameter holding its private half.
    - ``files_bucket_name``: the bucket of the hub configuration document and of the proxies' boot
      files that do not fit in the user data.
    - ``config_version``: the version of the hub configuration document.
    - ``route_target_group_arns``: route name -> its target group.
    - ``asg_arn``; ``slot_function`` (the :class:`SlotFunction`: its function, role and rule).
    """

    def __init__(self, scope: Construct, id: str, props: AwsHubProps):
        super().__init__(scope, id)
        hub = props.hub
        plan = hub.aws_addresses()
        name = f"tunnelhub-{hub.name}"
        iam_name = f"{name}-{hub.region}"  # IAM names are global to the account
        partition = DataAwsPartition(self, "partition").partition
        account = DataAwsCallerIdentity(self, "account").account_id
        arn = {service: f"arn:{partition}:{service}:{hub.region}:{account}" for service in ("ec2", "autoscaling", "ssm")}

        # -- network ------------------------------------------------------------------------
        network = AwsNetwork(self, "network", AwsNetworkProps(hub=hub))
        self.vpc_id = network.vpc_id
        self.proxy_subnet_ids = network.proxy_subnet_ids
        self.nlb_subnet_ids = network.nlb_subnet_ids
        self.nlb_route_table_ids = network.nlb_route_table_ids
        self.classic_peering_id = network.classic_peering_id

        # -- slots --------------------------------------------------------------------------
        slots = Construct(self, "slots")
        eips = [
            Eip(
                slots,
                f"eip{n}",
                domain="vpc",
                tags={"Name": f"{name}-slot-{n}", DEFAULT_POOL_TAG_KEY: hub.name, DEFAULT_SLOT_TAG_KEY: str(n)},
            )
            for n in range(hub.proxies.count)
        ]
        self.slot_public_ips: list[str] = [e.public_ip for e in eips]
        self.slot_private_ips: list[str] = [str(ip) for ip in plan.slot_private_ips]
        self.tunnel_endpoints: list[str] = self.slot_private_ips if hub.private_circuit else self.slot_public_ips
        # With a NAT gateway in an existing VPC the NAT is the VPC owner's: its address is unknown here.
        self.egress_public_ips: list[str] = (
            network.nat_public_ips if hub.egress == "nat_gateway" else self.slot_public_ips
        )
        slot_subnets = {
            n: SlotAddress(subnet_id=network.proxy_subnet_ids[plan.slot_zones[n]], ip=ip)
            for n, ip in enumerate(self.slot_private_ips)
        }

        # -- security groups ----------------------------------------------------------------
        proxy_sg = SecurityGroup(
            self, "proxy-sg", name=f"{name}-proxies", vpc_id=network.vpc_id,
            description=f"tunnelhub {hub.name} proxies: SSH from on-prem, routes and health from the NLB",
            tags={"Name": f"{name}-proxies"},
        )
        nlb_sg = SecurityGroup(
            self, "nlb-sg", name=f"{name}-nlb", vpc_id=network.vpc_id,
            description=f"tunnelhub {hub.name} NLB: route ports from Databricks classic",
            tags={"Name": f"{name}-nlb"},
        )
        self.proxy_security_group_id = proxy_sg.id
        self.nlb_security_group_id = nlb_sg.id
        self._proxy_rules(hub, proxy_sg.id, nlb_sg.id)
        self._nlb_rules(hub, nlb_sg.id, proxy_sg.id)

        # -- proxy identity: role, host key ---------------------------------------------------
        self.host_key_parameter_name = host_key_parameter_name(hub)
        parameter_arn = f"{arn['ssm']}:parameter{self.host_key_parameter_name}"
        proxy_role = IamRole(
            self, "proxy-role", name=f"{iam_name}-proxy",
            description=f"tunnelhub {hub.name} proxies: read the hub host key and boot files",
            assume_role_policy=_service_trust(self, "proxy-trust", "ec2.amazonaws.com").json,
        )
        proxy_statements = [DataAwsIamPolicyDocumentStatement(
            sid="ReadHostKey", effect="Allow", actions=["ssm:GetParameter"], resources=[parameter_arn],
        )]
        boot_ready: list[ITerraformDependable] = []
        document = props.document if props.document is not None else render_document(hub)
        self.config_version: str = document.version
        files = FilesBucket(self, "files", FilesBucketProps(
            bucket_name=files_bucket_name(hub.name, account, hub.region), document=document,
            files=props.user_data.s3_objects,
        ))
        self.files_bucket_name: str = files.bucket_name
        proxy_statements.append(DataAwsIamPolicyDocumentStatement(
            sid="ReadBootFilesAndHubConfig", effect="Allow", actions=["s3:GetObject"], resources=files.readable_arns,
        ))
        boot_ready.extend(files.ready)
        proxy_policy = DataAwsIamPolicyDocument(self, "proxy-policy", statement=proxy_statements)
        proxy_role_policy = IamRolePolicy(self, "proxy-role-policy", name="boot", role=proxy_role.id,
                                          policy=proxy_policy.json)
        profile = IamInstanceProfile(self, "proxy-profile", name=f"{iam_name}-proxy", role=proxy_role.name)

        host_key = Construct(self, "host-key")
        key_policy = DataAwsIamPolicyDocument(
            host_key, "kms-policy",
            statement=[
                DataAwsIamPolicyDocumentStatement(
                    sid="AccountAdministersTheKey", effect="Allow", actions=["kms:*"], resources=["*"],
                    principals=[DataAwsIamPolicyDocumentStatementPrincipals(
                        type="AWS", identifiers=[f"arn:{partition}:iam::{account}:root"])],
                ),
                DataAwsIamPolicyDocumentStatement(
                    sid="ProxiesDecryptTheHostKeyThroughSsm", effect="Allow", actions=["kms:Decrypt"], resources=["*"],
                    principals=[DataAwsIamPolicyDocumentStatementPrincipals(type="AWS", identifiers=[proxy_role.arn])],
                    condition=[
                        DataAwsIamPolicyDocumentStatementCondition(
                            test="StringEquals", variable="kms:ViaService", values=[f"ssm.{hub.region}.amazonaws.com"]),
                        DataAwsIamPolicyDocumentStatementCondition(
                            test="StringEquals", variable="kms:EncryptionContext:PARAMETER_ARN", values=[parameter_arn]),
                    ],
                ),
            ],
        )
        kms_key = KmsKey(
            host_key, "kms-key", description=f"tunnelhub {hub.name}: the hub SSH host key in SSM",
            enable_key_rotation=True, deletion_window_in_days=30, policy=key_policy.json,
        )
        KmsAlias(host_key, "kms-alias", name=f"alias/{name}/host-key", target_key_id=kms_key.key_id)
        private_key = PrivateKey(host_key, "key", algorithm="ED25519")
        parameter = SsmParameter(
            host_key, "parameter", name=self.host_key_parameter_name, type="SecureString",
            description=f"tunnelhub {hub.name}: SSH host private key of every proxy (OpenSSH format)",
            value=private_key.private_key_openssh, key_id=kms_key.arn,
        )
        self.host_public_key = private_key.public_key_openssh

        # -- NLB, target groups, listeners ----------------------------------------------------
        self._build_nlb(hub, name, network, nlb_sg.id)

        # -- endpoint service ----------------------------------------------------------------
        service = VpcEndpointService(
            self, "endpoint-service", acceptance_required=True, network_load_balancer_arns=[self.nlb_arn],
            allowed_principals=allowed_endpoint_principals(hub), supported_ip_address_types=["ipv4"],
            tags={"Name": name}, lifecycle=protected(hub),
        )
        self.endpoint_service_id = service.id
        self.endpoint_service_name = service.service_name

        # -- launch template ---------------------------------------------------------------
        arch = ubuntu_architecture(hub.proxy_size)
        ami = DataAwsAmi(
            self, "ubuntu", most_recent=True, owners=[UBUNTU_OWNER],
            filter=[
                DataAwsAmiFilter(name="name", values=[UBUNTU_NAME.format(arch=arch)]),
                DataAwsAmiFilter(name="architecture", values=["arm64" if arch == "arm64" else "x86_64"]),
                DataAwsAmiFilter(name="virtualization-type", values=["hvm"]),
                DataAwsAmiFilter(name="root-device-type", values=["ebs"]),
            ],
        )
        instance_tags = {"Name": f"{name}-proxy", "tunnelhub:hub": hub.name, **hub.tags}
        template = LaunchTemplate(
            self, "launch-template", name=f"{name}-proxy",
            description=f"tunnelhub {hub.name} proxies (Ubuntu 24.04, cloud-init from the hub spec)",
            image_id=ami.id, instance_type=hub.proxy_size,
            key_name=hub.aws.key_pair_name if hub.aws is not None else None,
            iam_instance_profile=LaunchTemplateIamInstanceProfile(arn=profile.arn),
            metadata_options=LaunchTemplateMetadataOptions(
                http_endpoint="enabled", http_tokens="required", http_put_response_hop_limit=1,
                instance_metadata_tags="enabled",
            ),
            block_device_mappings=[LaunchTemplateBlockDeviceMappings(
                device_name=ami.root_device_name,
                ebs=LaunchTemplateBlockDeviceMappingsEbs(
                    volume_size=ROOT_VOLUME_GIB, volume_type="gp3", encrypted="true", delete_on_termination="true",
                ),
            )],
            network_interfaces=[LaunchTemplateNetworkInterfaces(
                device_index=0, security_groups=[proxy_sg.id],
                associate_public_ip_address="false",  # the slot's Elastic IP is the only public address
                delete_on_termination="true",
            )],
            monitoring=LaunchTemplateMonitoring(enabled=True),
            user_data=props.user_data.base64,
            update_default_version=True,
            tag_specifications=[
                LaunchTemplateTagSpecifications(resource_type=kind, tags=instance_tags)
                for kind in ("instance", "volume", "network-interface")
            ],
            # Canonical publishes new images every few weeks: adopting one must be a decision
            # (terraform apply -replace), not a side effect that rolls every proxy.
            lifecycle=TerraformResourceLifecycle(ignore_changes=["image_id"]),
        )

        # -- slot Lambda, then the group --------------------------------------------------------
        self.asg_name = f"{name}-proxies"
        self.lifecycle_hook_name = LIFECYCLE_HOOK_NAME
        slot_function = SlotFunction(
            self, "slot-function",
            SlotFunctionProps(
                hub_name=hub.name, asg_name=self.asg_name, hook_name=LIFECYCLE_HOOK_NAME,
                arn_prefix=arn,
                proxy_subnet_arns=[f"{arn['ec2']}:subnet/{s}" for s in network.proxy_subnet_ids],
                slot_private_ips=encode_slot_private_ips(slot_subnets),
                name_prefix=name, iam_name_prefix=iam_name,
                reserved_concurrency=hub.aws.slot_lambda_reserved_concurrency if hub.aws is not None else None,
            ),
        )
        self.slot_function = slot_function
        ready: list[ITerraformDependable] = [
            *slot_function.ready, *network.ready, *eips, parameter, kms_key, proxy_role_policy,
            self._health_listener, *boot_ready,
        ]
        group = AutoscalingGroup(
            self, "asg", name=self.asg_name,
            min_size=hub.proxies.count, max_size=hub.proxies.count, desired_capacity=hub.proxies.count,
            vpc_zone_identifier=network.proxy_subnet_ids,
            launch_template=AutoscalingGroupLaunchTemplate(id=template.id, version=Token.as_string(template.latest_version)),
            health_check_type="ELB", health_check_grace_period=HEALTH_CHECK_GRACE_S,
            target_group_arns=[self._health_target_group.arn],
            initial_lifecycle_hook=[AutoscalingGroupInitialLifecycleHook(
                name=LIFECYCLE_HOOK_NAME, lifecycle_transition="autoscaling:EC2_INSTANCE_LAUNCHING",
                default_result="ABANDON", heartbeat_timeout=LIFECYCLE_HEARTBEAT_S,
            )],
            instance_refresh=AutoscalingGroupInstanceRefresh(
                strategy="Rolling",
                # There is no spare slot: replace one proxy at a time, terminating before launching.
                preferences=AutoscalingGroupInstanceRefreshPreferences(
                    min_healthy_percentage=50, max_healthy_percentage=100, skip_matching=True,
                ),
            ),
            tag=[
                AutoscalingGroupTag(key="Name", value=f"{name}-proxy", propagate_at_launch=False),
                # The slot wait reads these from instance metadata: a new proxy count changes the
                # group's tags (no instance refresh), not the launch template's user data.
                AutoscalingGroupTag(key=AWS_SLOT_COUNT_TAG, value=str(hub.proxies.count), propagate_at_launch=True),
                AutoscalingGroupTag(key=AWS_SLOT_ADDRESSES_TAG, value=",".join(self.slot_private_ips),
                                    propagate_at_launch=True),
            ],
            depends_on=ready,
        )
        self.asg_arn = group.arn
        self.alerts_topic_arn: str | None = None
        if hub.monitoring.alerts:
            self._alarms(hub, name, slot_function)

    # -- alarms ---------------------------------------------------------------------------------

    def _alarms(self, hub: S.Hub, name: str, slot_function: SlotFunction) -> None:
        """Per route target group two CloudWatch alarms on the NLB's ``HealthyHostCount``: route
        down (< 1) and degraded (< proxies.count); one alarm on the group's abandoned launches
        (the slot Lambda's ``decision: "abandoned"`` log lines, counted by a metric filter); all of
        them notify one SNS topic with the spec's email and https subscriptions.

        ``HealthyHostCount`` is the NLB's own view, which already waits the probe detection time;
        the alarm takes the **Maximum** over each minute of the window W
        (tunnelhub.constructs.alerting), so it fires only when the route had fewer healthy
        proxies in every sample of W consecutive minutes, and a route flapping faster than the
        NLB's detection time does not page on every flap."""
        mon = hub.monitoring
        scope = Construct(self, "alarms")
        timing = alert_timing(hub)
        self.alert_timing = timing
        # Not encrypted with KMS: CloudWatch can publish to an encrypted topic only through a customer
        # managed key whose policy admits cloudwatch.amazonaws.com (checkov/aws.yaml, CKV_AWS_26).
        topic = SnsTopic(scope, "topic", name=f"{name}-alerts", display_name=f"tunnelhub {hub.name}"[:100],
                         tags={"Name": f"{name}-alerts"})
        self.alerts_topic_arn = topic.arn
        for k, email in enumerate(mon.email):
            SnsTopicSubscription(scope, f"email{k}", topic_arn=topic.arn, protocol="email", endpoint=email)
        for k, url in enumerate(mon.webhook):
            SnsTopicSubscription(scope, f"webhook{k}", topic_arn=topic.arn, protocol="https", endpoint=url)
        notify = {"alarm_actions": [topic.arn], "ok_actions": [topic.arn]}
        for route in hub.routes:
            group = self._route_target_groups[route.name]
            at = Construct(scope, f"route-{route.name}")
            health = {
                "namespace": "AWS/NetworkELB", "metric_name": "HealthyHostCount", "statistic": "Maximum",
                "dimensions": {"TargetGroup": group.arn_suffix, "LoadBalancer": self._nlb.arn_suffix},
                "period": METRIC_GRAIN_S, "evaluation_periods": timing.evaluation_periods,
                "datapoints_to_alarm": timing.evaluation_periods, "comparison_operator": "LessThanThreshold",
                # No data is "unknown" (INSUFFICIENT_DATA), not "down": a new alarm has none yet.
                "treat_missing_data": "missing", **notify,
            }
            CloudwatchMetricAlarm(
                at, "down", alarm_name=f"{name}-route-{route.name}-down", threshold=1,
                alarm_description=(f"Route {route.name} (port {route.port}) is down: the NLB had no healthy proxy "
                                   f"for {timing.window_s} s."),
                **health,
            )
            CloudwatchMetricAlarm(
                at, "degraded", alarm_name=f"{name}-route-{route.name}-degraded", threshold=hub.proxies.count,
                alarm_description=(f"Route {route.name} (port {route.port}) is degraded: fewer than "
                                   f"{hub.proxies.count} healthy proxies for {timing.window_s} s."),
                **health,
            )
        # The slot Lambda logs one JSON line per decision (docs/aws-slots.md, "Logs").
        CloudwatchLogMetricFilter(
            scope, "abandoned-filter", name=f"{name}-abandoned-launches",
            log_group_name=slot_function.log_group.name, pattern='{ $.decision = "abandoned" }',
            metric_transformation=CloudwatchLogMetricFilterMetricTransformation(
                namespace=METRIC_NAMESPACE, name=ABANDONED_METRIC, value="1",
                dimensions={"AutoScalingGroupName": "$.asg"},
            ),
        )
        CloudwatchMetricAlarm(
            scope, "abandoned", alarm_name=f"{name}-abandoned-launches",
            alarm_description=(f"The slot Lambda abandoned a launch of {self.asg_name} (no free slot, or an AWS "
                               "error): a slot stays empty until a launch succeeds (docs/aws-slots.md)."),
            namespace=METRIC_NAMESPACE, metric_name=ABANDONED_METRIC, statistic="Sum",
            dimensions={"AutoScalingGroupName": self.asg_name}, period=ABANDONED_PERIOD_S, evaluation_periods=1,
            threshold=1, comparison_operator="GreaterThanOrEqualToThreshold",
            # The filter emits nothing while no launch is abandoned.
            treat_missing_data="notBreaching", **notify,
        )

    # -- pieces ---------------------------------------------------------------------------------

    def _proxy_rules(self, hub: S.Hub, proxy_sg: str, nlb_sg: str) -> None:
        rules = Construct(self, "proxy-sg-rules")
        for k, cidr in enumerate(hub.onprem.source_cidrs):
            VpcSecurityGroupIngressRule(
                rules, f"ssh-onprem{k}", security_group_id=proxy_sg, ip_protocol="tcp", from_port=22, to_port=22,
                cidr_ipv4=str(cidr), description="tunnel SSH from the on-prem tunnel host",
            )
        for route in hub.routes:
            VpcSecurityGroupIngressRule(
                rules, f"route-{route.name}", security_group_id=proxy_sg, ip_protocol="tcp",
                from_port=route.port, to_port=route.port, referenced_security_group_id=nlb_sg,
                description=f"route {route.name} from the NLB",
            )
        port = hub.proxies.health_port
        VpcSecurityGroupIngressRule(
            rules, "health", security_group_id=proxy_sg, ip_protocol="tcp", from_port=port, to_port=port,
            referenced_security_group_id=nlb_sg, description="health checks from the NLB",
        )
        for k, cidr in enumerate(hub.monitoring.scrape_cidrs):
            VpcSecurityGroupIngressRule(
                rules, f"health-scrape{k}", security_group_id=proxy_sg, ip_protocol="tcp", from_port=port,
                to_port=port, cidr_ipv4=str(cidr), description="Prometheus scrapers of GET /metrics (monitoring.scrape_cidrs)",
            )
        # The rollout gate: a proxy's reconciler asks its canary peer's health endpoint.
        VpcSecurityGroupIngressRule(
            rules, "health-from-peers", security_group_id=proxy_sg, ip_protocol="tcp", from_port=port, to_port=port,
            referenced_security_group_id=proxy_sg, description="health endpoint from the other proxies (rollout gate)",
        )
        VpcSecurityGroupEgressRule(
            rules, "health-to-peers", security_group_id=proxy_sg, ip_protocol="tcp", from_port=port, to_port=port,
            referenced_security_group_id=proxy_sg, description="health endpoint of the other proxies (rollout gate)",
        )
        # The peer path: a proxy whose own tunnels are down carries a route through a peer's peer port
        # (HAProxy backup servers; docs/proxy-runtime.md).
        for route in hub.tunnel_routes:
            VpcSecurityGroupIngressRule(
                rules, f"peer-{route.name}-from-peers", security_group_id=proxy_sg, ip_protocol="tcp",
                from_port=route.peer_port, to_port=route.peer_port, referenced_security_group_id=proxy_sg,
                description=f"route {route.name}'s peer path from the other proxies",
            )
            VpcSecurityGroupEgressRule(
                rules, f"peer-{route.name}-to-peers", security_group_id=proxy_sg, ip_protocol="tcp",
                from_port=route.peer_port, to_port=route.peer_port, referenced_security_group_id=proxy_sg,
                description=f"route {route.name}'s peer path to the other proxies",
            )
        egress_ports = sorted({*PROXY_EGRESS_PORTS, *(r.target_port for r in hub.forward_routes)})
        for port in egress_ports:
            routes = [r.name for r in hub.forward_routes if r.target_port == port]
            why = f"forward route {', '.join(routes)}" if routes else "packages and AWS APIs"
            if port in PROXY_EGRESS_PORTS and routes:
                why += ", packages and AWS APIs"
            VpcSecurityGroupEgressRule(
                rules, f"egress-tcp{port}", security_group_id=proxy_sg, ip_protocol="tcp", from_port=port,
                to_port=port, cidr_ipv4="0.0.0.0/0", description=why,
            )

    def _nlb_rules(self, hub: S.Hub, nlb_sg: str, proxy_sg: str) -> None:
        rules = Construct(self, "nlb-sg-rules")
        classic = hub.databricks.classic if hub.databricks is not None else None
        for route in hub.routes:
            for k, cidr in enumerate(classic.cidrs if classic is not None else []):
                VpcSecurityGroupIngressRule(
                    rules, f"route-{route.name}-classic{k}", security_group_id=nlb_sg, ip_protocol="tcp",
                    from_port=route.port, to_port=route.port, cidr_ipv4=str(cidr),
                    description=f"route {route.name} from Databricks classic compute",
                )
            VpcSecurityGroupEgressRule(
                rules, f"to-proxies-{route.name}", security_group_id=nlb_sg, ip_protocol="tcp",
                from_port=route.port, to_port=route.port, referenced_security_group_id=proxy_sg,
                description=f"route {route.name} to the proxies",
            )
        port = hub.proxies.health_port
        VpcSecurityGroupEgressRule(
            rules, "to-proxies-health", security_group_id=nlb_sg, ip_protocol="tcp", from_port=port, to_port=port,
            referenced_security_group_id=proxy_sg, description="health checks to the proxies",
        )

    def _build_nlb(self, hub: S.Hub, name: str, network: AwsNetwork, nlb_sg: str) -> None:
        px = hub.proxies
        nlb_ns = Construct(self, "nlb")
        nlb = Lb(
            nlb_ns, "lb", name=name, internal=True, load_balancer_type="network",
            subnets=network.nlb_subnet_ids, security_groups=[nlb_sg], ip_address_type="ipv4",
            enable_cross_zone_load_balancing=True,
            # PrivateLink traffic arrives with the consumer's (Databricks') addresses, unknown here;
            # the endpoint service's acceptance and allowed principals gate it instead.
            enforce_security_group_inbound_rules_on_private_link_traffic="off",
            tags={"Name": name}, lifecycle=protected(hub),
        )
        self._nlb = nlb
        self.nlb_arn = nlb.arn
        self.nlb_dns_name = nlb.dns_name
        self.nlb_zone_id = nlb.zone_id

        def health_check(path: str, unhealthy_threshold: int) -> LbTargetGroupHealthCheck:
            return LbTargetGroupHealthCheck(
                enabled=True, protocol="HTTP", port=str(px.health_port), path=path, matcher="200",
                interval=px.probe_interval_s, timeout=HEALTH_CHECK_TIMEOUT_S,
                healthy_threshold=px.probe_threshold, unhealthy_threshold=unhealthy_threshold,
            )

        self.route_target_group_arns: dict[str, str] = {}
        self._route_target_groups: dict[str, LbTargetGroup] = {}
        routes_ns = Construct(nlb_ns, "routes")
        for route in hub.routes:
            ns = Construct(routes_ns, route.name)
            group = LbTargetGroup(
                ns, "target-group", port=route.port, protocol="TCP", target_type="ip", vpc_id=network.vpc_id,
                ip_address_type="ipv4", preserve_client_ip="false",
                deregistration_delay=str(DEREGISTRATION_DELAY_S), connection_termination=True,
                health_check=health_check(route.health_path, px.probe_threshold),
                tags={"Name": f"{name}-{route.name}"},
            )
            for n, ip in enumerate(self.slot_private_ips):
                LbTargetGroupAttachment(ns, f"slot{n}", target_group_arn=group.arn, target_id=ip, port=route.port)
            LbListener(
                ns, "listener", load_balancer_arn=nlb.arn, port=route.port, protocol="TCP",
                tcp_idle_timeout_seconds=route.idle_timeout_min * 60,
                default_action=[LbListenerDefaultAction(type="forward", target_group_arn=group.arn)],
            )
            self.route_target_group_arns[route.name] = group.arn
            self._route_target_groups[route.name] = group

        # The group's own health: /healthz answers for the daemon, never for a route. Its listener
        # exists only because a target group is health-checked once a load balancer uses it.
        health_ns = Construct(nlb_ns, "instance-health")
        self._health_target_group = LbTargetGroup(
            health_ns, "target-group", port=px.health_port, protocol="TCP", target_type="instance",
            vpc_id=network.vpc_id, deregistration_delay=str(DEREGISTRATION_DELAY_S), connection_termination=True,
            health_check=health_check(INSTANCE_HEALTH_PATH, INSTANCE_UNHEALTHY_THRESHOLD),
            tags={"Name": f"{name}-instance-health"},
        )
        self._health_listener = LbListener(
            health_ns, "listener", load_balancer_arn=nlb.arn, port=px.health_port, protocol="TCP",
            default_action=[LbListenerDefaultAction(type="forward", target_group_arn=self._health_target_group.arn)],
        )


def _service_trust(scope: Construct, id: str, service: str) -> DataAwsIamPolicyDocument:
    return DataAwsIamPolicyDocument(
        scope, id,
        statement=[DataAwsIamPolicyDocumentStatement(
            effect="Allow", actions=["sts:AssumeRole"],
            principals=[DataAwsIamPolicyDocumentStatementPrincipals(type="Service", identifiers=[service])],
        )],
    )
