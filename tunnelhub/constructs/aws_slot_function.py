"""The slot Lambda as deployed: its archive, function, log group, least-privilege role, and the
EventBridge rule that delivers the group's launch lifecycle actions to it.

The function's source is ``slot_lambda/handler.py`` (see docs/aws-slots.md for its flow, error
policy and the exact IAM actions it calls). It is packaged here into a zip built byte for byte
the same on every synthesis (fixed timestamps and permissions, one member), so the stack
directory is self-contained (Terraform Cloud uploads it as is) and a parallel synthesis writes
the same files as a sequential one. cdktf's own archive assets stamp the files' mtimes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cdktf import AssetType, ITerraformDependable, TerraformAsset
from cdktf_cdktf_provider_aws.cloudwatch_event_rule import CloudwatchEventRule
from cdktf_cdktf_provider_aws.cloudwatch_event_target import CloudwatchEventTarget
from cdktf_cdktf_provider_aws.cloudwatch_log_group import CloudwatchLogGroup
from cdktf_cdktf_provider_aws.data_aws_iam_policy_document import (
    DataAwsIamPolicyDocument,
    DataAwsIamPolicyDocumentStatement,
    DataAwsIamPolicyDocumentStatementCondition,
    DataAwsIamPolicyDocumentStatementPrincipals,
)
from cdktf_cdktf_provider_aws.iam_role import IamRole
from cdktf_cdktf_provider_aws.iam_role_policy import IamRolePolicy
from cdktf_cdktf_provider_aws.lambda_function import LambdaFunction, LambdaFunctionEnvironment
from cdktf_cdktf_provider_aws.lambda_function_event_invoke_config import LambdaFunctionEventInvokeConfig
from cdktf_cdktf_provider_aws.lambda_permission import LambdaPermission
from constructs import Construct

from tunnelhub.constructs.slot_lambda import handler as slot_handler

SOURCE = Path(slot_handler.__file__).resolve()
ARCHIVE_NAME = "slot_lambda.zip"
RUNTIME = "python3.12"
HANDLER = "handler.lambda_handler"
TIMEOUT_S = 60
MEMORY_MB = 128
LOG_RETENTION_DAYS = 365
MAX_RETRY_ATTEMPTS = 2
MAX_EVENT_AGE_S = 600
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class SlotArchive:
    """The function's deployment package on disk."""

    path: Path
    sha256_base64: str
    """What Lambda reports as ``CodeSha256`` (the provider's ``source_code_hash``)."""


@lru_cache(maxsize=1)
def slot_lambda_archive() -> SlotArchive:
    """The slot Lambda's zip: ``handler.py`` alone, byte-identical on every build.

    Written once per content into a content-addressed temporary directory (atomically, so
    parallel synthesis workers can share it); TerraformAsset copies it into the stack.
    """
    data = _zip_bytes({"handler.py": SOURCE.read_bytes()})
    digest = hashlib.sha256(data)
    directory = Path(tempfile.gettempdir()) / "tunnelhub-assets" / digest.hexdigest()
    path = directory / ARCHIVE_NAME
    if not path.exists() or path.read_bytes() != data:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".slot_lambda.")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    return SlotArchive(path=path, sha256_base64=base64.b64encode(digest.digest()).decode())


def _zip_bytes(members: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, so the permissions below are read
            info.external_attr = (0o100644 & 0xFFFF) << 16
            archive.writestr(info, members[name], compresslevel=9)
    return buffer.getvalue()


@dataclass(frozen=True, kw_only=True)
class SlotFunctionProps:
    """What :class:`SlotFunction` needs to know about its hub."""

    hub_name: str
    """The hub: the value of the pool tag on its Elastic IPs."""
    asg_name: str
    """The proxies' Auto Scaling group (created after this function, by name)."""
    hook_name: str
    """The group's launch lifecycle hook the function answers."""
    arn_prefix: Mapping[str, str]
    """``{"ec2": "arn:<partition>:ec2:<region>:<account>", "autoscaling": ..., "iam": ...}``."""
    proxy_subnet_arns: Sequence[str]
    """The subnets the group launches into: the only interfaces the function may touch."""
    slot_private_ips: str
    """The ``SLOT_PRIVATE_IPS`` value (``encode_slot_private_ips``)."""
    name_prefix: str
    """Prefix of the function, role, rule and log group names (``tunnelhub-<hub>``)."""
    iam_name_prefix: str = ""
    """Prefix of the role name (IAM is global: it includes the region); default: name_prefix."""
    pool_tag_key: str = slot_handler.DEFAULT_POOL_TAG_KEY
    """Default: tunnelhub:pool (what the proxies' cloud-init and docs/aws-slots.md use)."""
    slot_tag_key: str = slot_handler.DEFAULT_SLOT_TAG_KEY
    """Default: tunnelhub:slot (the proxies read it from instance metadata)."""
    reserved_concurrency: int | None = None
    """``reserved_concurrent_executions`` (spec ``aws.slot_lambda_reserved_concurrency``). Default:
    none, the account's unreserved pool: AWS refuses a reservation that leaves less than the
    account's minimum unreserved concurrency (100 at the default quota), which fails on new or
    low-quota accounts."""


class SlotFunction(Construct):
    """The slot Lambda and everything that invokes and permits it.

    Read-only attributes: ``function`` (the Lambda), ``log_group`` (its CloudWatch log group,
    which the hub's abandoned-launch metric filter reads), ``role`` (its execution role), ``policy``
    (the role's only policy document), ``rule`` (the EventBridge rule), ``event_pattern`` (the
    rule's pattern as a dict), ``environment`` (the function's variables), and ``ready`` (what
    must exist before the group's first launch, for ``depends_on``).
    """

    def __init__(self, scope: Construct, id: str, props: SlotFunctionProps):
        super().__init__(scope, id)
        function_name = f"{props.name_prefix}-slots"
        ec2 = props.arn_prefix["ec2"]
        asg_arn = (
            f"{props.arn_prefix['autoscaling']}:autoScalingGroup:*:autoScalingGroupName/{props.asg_name}"
        )

        self.log_group = log_group = CloudwatchLogGroup(
            self,
            "logs",
            name=f"/aws/lambda/{function_name}",
            retention_in_days=LOG_RETENTION_DAYS,
        )

        trust = DataAwsIamPolicyDocument(
            self,
            "trust",
            statement=[
                DataAwsIamPolicyDocumentStatement(
                    effect="Allow",
                    actions=["sts:AssumeRole"],
                    principals=[
                        DataAwsIamPolicyDocumentStatementPrincipals(type="Service", identifiers=["lambda.amazonaws.com"])
                    ],
                )
            ],
        )
        self.role = IamRole(
            self,
            "role",
            name=f"{props.iam_name_prefix or props.name_prefix}-slot-lambda",
            description=f"tunnelhub {props.hub_name}: the slot Lambda (docs/aws-slots.md)",
            assume_role_policy=trust.json,
        )

        def cond(test: str, variable: str, values: Sequence[str]) -> DataAwsIamPolicyDocumentStatementCondition:
            return DataAwsIamPolicyDocumentStatementCondition(test=test, variable=variable, values=list(values))

        in_group = cond("StringEquals", f"aws:ResourceTag/{slot_handler.ASG_INSTANCE_TAG}", [props.asg_name])
        proxy_subnets = cond("StringEquals", "ec2:Subnet", props.proxy_subnet_arns)
        self.policy = DataAwsIamPolicyDocument(
            self,
            "policy",
            statement=[
                DataAwsIamPolicyDocumentStatement(
                    sid="DescribeCannotBeScoped",
                    effect="Allow",
                    actions=["ec2:DescribeAddresses", "ec2:DescribeInstances"],
                    resources=["*"],
                ),
                DataAwsIamPolicyDocumentStatement(
                    sid="PoolAddressesOnly",
                    effect="Allow",
                    actions=["ec2:AssociateAddress", "ec2:DisassociateAddress"],
                    resources=[f"{ec2}:elastic-ip/*"],
                    condition=[cond("StringEquals", f"aws:ResourceTag/{props.pool_tag_key}", [props.hub_name])],
                ),
                DataAwsIamPolicyDocumentStatement(
                    sid="ProxySubnetInterfacesOnly",
                    effect="Allow",
                    actions=[
                        "ec2:AssignPrivateIpAddresses",
                        "ec2:AssociateAddress",
                        "ec2:DisassociateAddress",
                        "ec2:UnassignPrivateIpAddresses",
                    ],
                    resources=[f"{ec2}:network-interface/*"],
                    condition=[proxy_subnets],
                ),
                DataAwsIamPolicyDocumentStatement(
                    sid="GroupInstancesOnly",
                    effect="Allow",
                    actions=["ec2:AssociateAddress", "ec2:DisassociateAddress"],
                    resources=[f"{ec2}:instance/*"],
                    condition=[in_group],
                ),
                DataAwsIamPolicyDocumentStatement(
                    sid="SlotTagOnGroupInstancesOnly",
                    effect="Allow",
                    actions=["ec2:CreateTags"],
                    resources=[f"{ec2}:instance/*"],
                    condition=[
                        in_group,
                        cond("ForAllValues:StringEquals", "aws:TagKeys", [props.slot_tag_key]),
                        cond("Null", "aws:TagKeys", ["false"]),
                    ],
                ),
                DataAwsIamPolicyDocumentStatement(
                    sid="OwnGroupLifecycleActions",
                    effect="Allow",
                    actions=["autoscaling:CompleteLifecycleAction"],
                    resources=[asg_arn],
                ),
                DataAwsIamPolicyDocumentStatement(
                    sid="OwnLogGroup",
                    effect="Allow",
                    actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                    resources=[f"{log_group.arn}:*"],
                ),
            ],
        )
        role_policy = IamRolePolicy(self, "role-policy", name="slots", role=self.role.id, policy=self.policy.json)

        archive = slot_lambda_archive()
        asset = TerraformAsset(self, "code", path=str(archive.path), type=AssetType.FILE)
        self.environment = {
            slot_handler.ENV_HUB: props.hub_name,
            slot_handler.ENV_ASG_NAME: props.asg_name,
            slot_handler.ENV_HOOK_NAME: props.hook_name,
            slot_handler.ENV_POOL_TAG_KEY: props.pool_tag_key,
            slot_handler.ENV_SLOT_TAG_KEY: props.slot_tag_key,
            slot_handler.ENV_SLOT_PRIVATE_IPS: props.slot_private_ips,
        }
        self.function = LambdaFunction(
            self,
            "function",
            function_name=function_name,
            description=f"tunnelhub {props.hub_name}: gives each launching proxy a free slot (docs/aws-slots.md)",
            role=self.role.arn,
            runtime=RUNTIME,
            handler=HANDLER,
            filename=asset.path,
            source_code_hash=archive.sha256_base64,
            timeout=TIMEOUT_S,
            memory_size=MEMORY_MB,
            # Unreserved by default. Reserving 1 serializes decisions (twin deliveries of an event cannot
            # interleave); the handler is correct without it, and throttled async events are retried.
            reserved_concurrent_executions=props.reserved_concurrency,
            environment=LambdaFunctionEnvironment(variables=self.environment),
            depends_on=[log_group, role_policy],
        )
        invoke_config = LambdaFunctionEventInvokeConfig(
            self,
            "invoke-config",
            function_name=self.function.function_name,
            maximum_retry_attempts=MAX_RETRY_ATTEMPTS,
            maximum_event_age_in_seconds=MAX_EVENT_AGE_S,
        )

        self.event_pattern = slot_handler.launch_event_pattern(props.asg_name)
        self.rule = CloudwatchEventRule(
            self,
            "rule",
            name=f"{props.name_prefix}-slot-launch",
            description=f"tunnelhub {props.hub_name}: launch lifecycle actions of {props.asg_name} to the slot Lambda",
            event_pattern=json.dumps(self.event_pattern, sort_keys=True),
        )
        target = CloudwatchEventTarget(self, "target", rule=self.rule.name, arn=self.function.arn)
        permission = LambdaPermission(
            self,
            "permission",
            statement_id="AllowLaunchEventsFromItsRule",
            action="lambda:InvokeFunction",
            function_name=self.function.function_name,
            principal="events.amazonaws.com",
            source_arn=self.rule.arn,
        )
        self.ready: list[ITerraformDependable] = [self.function, role_policy, invoke_config, target, permission]
