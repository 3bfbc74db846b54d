"""Two stand-alone ~40-resource stacks for the synthesis-speed measurements.

Not tunnelhub's stacks: just enough real resources (with nested blocks, references
and outputs) of the aws and azurerm providers to time a synth. ``mod(name)``
returns the provider submodule ``name`` (however the caller chose to import it).
"""

from __future__ import annotations

from collections.abc import Callable

AWS_SUBMODULES = (
    "provider", "vpc", "subnet", "internet_gateway", "route_table", "route",
    "route_table_association", "security_group", "vpc_security_group_ingress_rule",
    "vpc_security_group_egress_rule", "lb", "lb_target_group", "lb_listener",
    "launch_template", "autoscaling_group", "eip", "nat_gateway", "iam_role",
    "iam_instance_profile", "iam_role_policy", "ssm_parameter", "cloudwatch_log_group",
)

AZURE_SUBMODULES = (
    "provider", "resource_group", "virtual_network", "subnet", "network_security_group",
    "network_security_rule", "subnet_network_security_group_association", "public_ip",
    "lb", "lb_backend_address_pool", "lb_probe", "lb_rule", "nat_gateway",
    "nat_gateway_public_ip_association", "subnet_nat_gateway_association",
    "linux_virtual_machine_scale_set", "user_assigned_identity", "log_analytics_workspace",
)

Mod = Callable[[str], object]


def aws_stack(cdktf, scope, stack_id: str, mod: Mod) -> None:
    """Build a proxy-hub-shaped aws stack (36 resources, 3 outputs)."""
    stack = cdktf.TerraformStack(scope, stack_id)
    mod("provider").AwsProvider(stack, "aws", region="eu-west-1")
    vpc = mod("vpc").Vpc(stack, "vpc", cidr_block="10.40.0.0/16", enable_dns_hostnames=True,
                         tags={"Name": f"{stack_id}-vpc"})
    subnets = [
        mod("subnet").Subnet(stack, f"subnet{i}", vpc_id=vpc.id, cidr_block=f"10.40.{i}.0/24",
                             availability_zone=f"eu-west-1{'abc'[i]}")
        for i in range(3)
    ]
    igw = mod("internet_gateway").InternetGateway(stack, "igw", vpc_id=vpc.id)
    table = mod("route_table").RouteTable(stack, "rt", vpc_id=vpc.id)
    mod("route").Route(stack, "default", route_table_id=table.id,
                       destination_cidr_block="0.0.0.0/0", gateway_id=igw.id)
    for i, subnet in enumerate(subnets):
        mod("route_table_association").RouteTableAssociation(
            stack, f"rta{i}", subnet_id=subnet.id, route_table_id=table.id)
    proxy_sg = mod("security_group").SecurityGroup(stack, "proxy-sg", vpc_id=vpc.id, name="proxy")
    lb_sg = mod("security_group").SecurityGroup(stack, "lb-sg", vpc_id=vpc.id, name="lb")
    for i, port in enumerate((22, 2222, 8080, 13306, 15432, 11433)):
        mod("vpc_security_group_ingress_rule").VpcSecurityGroupIngressRule(
            stack, f"in{i}", security_group_id=proxy_sg.id, ip_protocol="tcp",
            from_port=port, to_port=port, cidr_ipv4="10.40.0.0/16")
    for i, sg in enumerate((proxy_sg, lb_sg)):
        mod("vpc_security_group_egress_rule").VpcSecurityGroupEgressRule(
            stack, f"out{i}", security_group_id=sg.id, ip_protocol="-1", cidr_ipv4="0.0.0.0/0")
    lb = mod("lb").Lb(stack, "nlb", load_balancer_type="network", internal=True,
                      subnets=[s.id for s in subnets], security_groups=[lb_sg.id])
    target = mod("lb_target_group").LbTargetGroup(
        stack, "tg", port=2222, protocol="TCP", vpc_id=vpc.id,
        health_check={"port": "8080", "protocol": "HTTP", "path": "/healthz"})
    for i, port in enumerate((2222, 13306)):
        mod("lb_listener").LbListener(stack, f"listener{i}", load_balancer_arn=lb.arn, port=port,
                                      protocol="TCP",
                                      default_action=[mod("lb_listener").LbListenerDefaultAction(
                                          type="forward", target_group_arn=target.arn)])
    role = mod("iam_role").IamRole(stack, "role", name=f"{stack_id}-proxy", assume_role_policy=(
        '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"sts:AssumeRole",'
        '"Principal":{"Service":"ec2.amazonaws.com"}}]}'))
    profile = mod("iam_instance_profile").IamInstanceProfile(stack, "profile", role=role.name)
    mod("iam_role_policy").IamRolePolicy(stack, "policy", role=role.id, policy=(
        '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"ssm:GetParameter",'
        '"Resource":"*"}]}'))
    template = mod("launch_template").LaunchTemplate(
        stack, "lt", image_id="ami-0123456789abcdef0", instance_type="t3.small",
        iam_instance_profile={"arn": profile.arn}, vpc_security_group_ids=[proxy_sg.id],
        user_data=cdktf.Fn.base64encode("#cloud-config\n"))
    mod("autoscaling_group").AutoscalingGroup(
        stack, "asg", min_size=2, max_size=2, vpc_zone_identifier=[s.id for s in subnets],
        target_group_arns=[target.arn], launch_template={"id": template.id, "version": "$Latest"})
    for i in range(2):
        eip = mod("eip").Eip(stack, f"eip{i}", domain="vpc")
        mod("nat_gateway").NatGateway(stack, f"nat{i}", allocation_id=eip.id, subnet_id=subnets[i].id)
    for i in range(4):
        mod("ssm_parameter").SsmParameter(stack, f"param{i}", name=f"/{stack_id}/p{i}",
                                          type="String", value=f"value-{i}")
    mod("cloudwatch_log_group").CloudwatchLogGroup(stack, "logs", name=f"/{stack_id}/proxy",
                                                   retention_in_days=30)
    cdktf.TerraformOutput(stack, "lb_dns", value=lb.dns_name)
    cdktf.TerraformOutput(stack, "vpc_id", value=vpc.id)
    cdktf.TerraformOutput(stack, "role_arn", value=role.arn)


def azure_stack(cdktf, scope, stack_id: str, mod: Mod) -> None:
    """Build a proxy-hub-shaped azurerm stack."""
    stack = cdktf.TerraformStack(scope, stack_id)
    mod("provider").AzurermProvider(stack, "azurerm", features=[mod("provider").AzurermProviderFeatures()])
    loc = "westeurope"
    rg = mod("resource_group").ResourceGroup(stack, "rg", name=f"{stack_id}-rg", location=loc)
    common = {"resource_group_name": rg.name}
    vnet = mod("virtual_network").VirtualNetwork(stack, "vnet", name="hub", location=loc,
                                                 address_space=["10.50.0.0/16"], **common)
    subnets = [mod("subnet").Subnet(stack, f"subnet{i}", name=f"s{i}", virtual_network_name=vnet.name,
                                    address_prefixes=[f"10.50.{i}.0/24"], **common) for i in range(3)]
    nsg = mod("network_security_group").NetworkSecurityGroup(stack, "nsg", name="proxy",
                                                             location=loc, **common)
    for i, port in enumerate((22, 2222, 8080, 13306, 15432, 11433, 1521, 5432, 3306, 1433)):
        mod("network_security_rule").NetworkSecurityRule(
            stack, f"rule{i}", name=f"allow-{port}", priority=100 + i, direction="Inbound",
            access="Allow", protocol="Tcp", source_port_range="*", destination_port_range=str(port),
            source_address_prefix="VirtualNetwork", destination_address_prefix="*",
            network_security_group_name=nsg.name, **common)
    for i, subnet in enumerate(subnets):
        mod("subnet_network_security_group_association").SubnetNetworkSecurityGroupAssociation(
            stack, f"nsga{i}", subnet_id=subnet.id, network_security_group_id=nsg.id)
    ips = [mod("public_ip").PublicIp(stack, f"pip{i}", name=f"pip{i}", location=loc,
                                     allocation_method="Static", sku="Standard", **common)
           for i in range(2)]
    lb = mod("lb").Lb(stack, "lb", name="proxy-lb", location=loc, sku="Standard",
                      frontend_ip_configuration=[mod("lb").LbFrontendIpConfiguration(
                          name="fe", subnet_id=subnets[0].id)], **common)
    pool = mod("lb_backend_address_pool").LbBackendAddressPool(stack, "pool", name="proxies",
                                                               loadbalancer_id=lb.id)
    probe = mod("lb_probe").LbProbe(stack, "probe", name="health", loadbalancer_id=lb.id, port=8080,
                                    protocol="Http", request_path="/healthz")
    for i, port in enumerate((2222, 13306, 15432, 11433)):
        mod("lb_rule").LbRule(stack, f"lbrule{i}", name=f"r{port}", loadbalancer_id=lb.id,
                              protocol="Tcp", frontend_port=port, backend_port=port,
                              frontend_ip_configuration_name="fe", probe_id=probe.id,
                              backend_address_pool_ids=[pool.id])
    nat = mod("nat_gateway").NatGateway(stack, "nat", name="nat", location=loc, **common)
    mod("nat_gateway_public_ip_association").NatGatewayPublicIpAssociation(
        stack, "natip", nat_gateway_id=nat.id, public_ip_address_id=ips[1].id)
    for i, subnet in enumerate(subnets):
        mod("subnet_nat_gateway_association").SubnetNatGatewayAssociation(
            stack, f"snat{i}", subnet_id=subnet.id, nat_gateway_id=nat.id)
    identity = mod("user_assigned_identity").UserAssignedIdentity(stack, "id", name="proxy",
                                                                  location=loc, **common)
    mod("log_analytics_workspace").LogAnalyticsWorkspace(stack, "law", name="proxy-logs",
                                                         location=loc, **common)
    vmss = mod("linux_virtual_machine_scale_set")
    for i in range(2):
        vmss.LinuxVirtualMachineScaleSet(
            stack, f"vmss{i}", name=f"proxy{i}", location=loc, sku="Standard_B2s", instances=1,
            admin_username="tunnel",
            admin_ssh_key=[vmss.LinuxVirtualMachineScaleSetAdminSshKey(
                username="tunnel", public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBench bench")],
            os_disk=vmss.LinuxVirtualMachineScaleSetOsDisk(caching="ReadWrite",
                                                            storage_account_type="Standard_LRS"),
            source_image_reference=vmss.LinuxVirtualMachineScaleSetSourceImageReference(
                publisher="Canonical", offer="ubuntu-24_04-lts", sku="server", version="latest"),
            network_interface=[vmss.LinuxVirtualMachineScaleSetNetworkInterface(
                name="nic", primary=True,
                ip_configuration=[vmss.LinuxVirtualMachineScaleSetNetworkInterfaceIpConfiguration(
                    name="ip", primary=True, subnet_id=subnets[i].id,
                    load_balancer_backend_address_pool_ids=[pool.id])])],
            identity=vmss.LinuxVirtualMachineScaleSetIdentity(type="UserAssigned",
                                                              identity_ids=[identity.id]),
            custom_data=cdktf.Fn.base64encode("#cloud-config\n"), **common)
    cdktf.TerraformOutput(stack, "lb_id", value=lb.id)
    cdktf.TerraformOutput(stack, "vnet_id", value=vnet.id)
