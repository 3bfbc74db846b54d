"""A synthesized hub stack, "applied" by the lab: what the cloud would hold after ``terraform apply``.

The boot lab takes everything its fake cloud serves from the synthesized stack JSON
(``cdktf.out/stacks/<stack>/cdk.tf.json``), never from calling the renderer: the proxies' user data
(``azurerm_linux_virtual_machine.custom_data``, ``aws_launch_template.user_data``), the VM tags and
identities, the Key Vault secret and who may read it, the SSM parameter, the instance profile and
its policy, the files bucket and its objects, the launch template's metadata options. What
Terraform computes at apply time is computed here the way the providers do it, for the attributes
the lab needs (each documented on :meth:`AppliedStack.attribute`); the lab's own inputs stand in for
what the cloud would choose (the subscription, the account, the Elastic IP addresses) and for the
``tls_private_key`` resources (keys the lab generates, so it knows the private halves).

Expressions are Terraform's: ``${<reference>}`` inside strings, and the few functions the stacks
use (``substr``, ``sha1``, ``lower``). Anything else is a :class:`LabError` naming the expression, so a
change in the stacks shows up as a clear lab failure, not a wrong value.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .proc import LabError

_REF = re.compile(r"^(data\.)?([a-z0-9_]+)\.([A-Za-z0-9_-]+)((?:\.[A-Za-z0-9_]+|\[\d+\])*)$")
_CALL = re.compile(r"^([a-z0-9_]+)\((.*)\)$", re.S)


@dataclass
class ApplyInputs:
    """What the cloud decides at apply time, and the keys the lab generated for the stack."""

    tls_key: Callable[[str], tuple[str, str]]
    """``tls_private_key`` resource name -> (private key OpenSSH, public key OpenSSH)."""
    azure_subscription_id: str = "11111111-2222-3333-4444-555555555555"
    azure_tenant_id: str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    azure_deployer_object_id: str = "99999999-8888-7777-6666-555555555555"
    aws_account_id: str = "123456789012"
    aws_eips: list[str] = field(default_factory=lambda: [f"198.51.100.{10 + n}" for n in range(16)])


class AppliedStack:
    def __init__(self, stack: dict, inputs: ApplyInputs):
        self.stack = stack
        self.inputs = inputs
        self.resources: dict[str, dict[str, dict]] = stack.get("resource", {})
        self.data: dict[str, dict[str, dict]] = stack.get("data", {})
        self._eips = {name: inputs.aws_eips[i] for i, name in enumerate(sorted(self.resources.get("aws_eip", {})))}

    # -- lookups ---------------------------------------------------------------------------------

    def of_type(self, rtype: str) -> dict[str, dict]:
        return self.resources.get(rtype, {})

    def one(self, rtype: str) -> tuple[str, dict]:
        found = self.of_type(rtype)
        if len(found) != 1:
            raise LabError(f"expected one {rtype} in the stack, found {sorted(found)}")
        return next(iter(found.items()))

    def body(self, rtype: str, name: str, *, data: bool = False) -> dict:
        table = self.data if data else self.resources
        try:
            return table[rtype][name]
        except KeyError:
            raise LabError(f"the stack has no {'data.' if data else ''}{rtype}.{name}") from None

    def provider(self, name: str) -> dict:
        configs = self.stack.get("provider", {}).get(name) or [{}]
        return configs[0]

    # -- expressions -----------------------------------------------------------------------------

    def resolve(self, value: Any) -> Any:
        """``value`` with every ``${...}`` replaced by what apply would have made of it."""
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items() if k != "//"}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if not isinstance(value, str) or "${" not in value:
            return value
        parts, rest = [], value
        while "${" in rest:
            before, _, after = rest.partition("${")
            depth, end = 1, None
            for i, ch in enumerate(after):
                depth += {"{": 1, "}": -1}.get(ch, 0)
                if depth == 0:
                    end = i
                    break
            if end is None:
                raise LabError(f"unterminated expression in {value!r}")
            result = self.evaluate(after[:end].strip())
            if before == "" and after[end + 1:] == "" and not parts:
                return result  # a whole-string expression keeps its type (a list, a number)
            parts += [before, str(result)]
            rest = after[end + 1:]
        return "".join(parts) + rest

    def evaluate(self, expression: str) -> Any:
        call = _CALL.match(expression)
        if call:
            name, args = call.group(1), [self.evaluate(a.strip()) for a in _split_args(call.group(2))]
            if name == "sha1":
                return hashlib.sha1(str(args[0]).encode()).hexdigest()
            if name == "substr":
                text, offset, length = str(args[0]), int(args[1]), int(args[2])
                return text[offset:] if length == -1 else text[offset:offset + length]
            if name == "lower":
                return str(args[0]).lower()
            raise LabError(f"the lab cannot apply Terraform function {name}() in ${{{expression}}}")
        if re.fullmatch(r"-?\d+", expression):
            return int(expression)
        if expression.startswith('"') and expression.endswith('"'):
            return json.loads(expression)
        ref = _REF.match(expression)
        if not ref:
            raise LabError(f"the lab cannot apply the expression ${{{expression}}}")
        data, rtype, name, path = ref.groups()
        steps = re.findall(r"\.([A-Za-z0-9_]+)|\[(\d+)\]", path)
        attrs = [s[0] if s[0] else int(s[1]) for s in steps]
        if not attrs:
            raise LabError(f"${{{expression}}}: a reference needs an attribute")
        return self.attribute(rtype, name, attrs, data=bool(data))

    # -- computed attributes (what the providers set at apply time) -------------------------------

    def attribute(self, rtype: str, name: str, attrs: list, *, data: bool = False) -> Any:
        """The value of ``<rtype>.<name>.<attrs>`` after apply.

        Configured arguments are returned as configured (resolved). Computed ones follow the
        providers: azurerm ids are ARM ids (``/subscriptions/<s>/resourceGroups/<g>/providers/...``);
        a Key Vault secret's ``versionless_id`` is ``<vault_uri without the trailing />/secrets/<name>``
        (``NestedItemId.VersionlessID``) and its ``resource_versionless_id`` the ARM id
        ``.../vaults/<vault>/secrets/<name>`` (``parse.NewSecretVersionlessID``), both
        terraform-provider-azurerm v4.55.0 ``internal/services/keyvault``; a VM's system-assigned
        ``identity[0].principal_id`` is a fresh UUID (here derived from the VM's name).
        """
        key = ".".join(str(a) for a in attrs)
        body = self.body(rtype, name, data=data)
        if data:
            computed = self._data_attribute(rtype, name, body, key)
        else:
            computed = self._resource_attribute(rtype, name, body, key)
        if computed is not None:
            return computed
        value: Any = body
        for step in attrs:
            try:
                value = value[step]
            except (KeyError, IndexError, TypeError):
                raise LabError(f"the lab cannot apply {rtype}.{name}.{key}: not configured in the stack and "
                               "not a computed attribute it models") from None
        return self.resolve(value)

    def _resource_attribute(self, rtype: str, name: str, body: dict, key: str) -> Any:
        sub = self.inputs.azure_subscription_id
        if rtype == "azurerm_resource_group" and key == "id":
            return f"/subscriptions/{sub}/resourceGroups/{self.resolve(body['name'])}"
        if rtype == "azurerm_key_vault":
            vault = self.resolve(body["name"])
            group = self.resolve(body["resource_group_name"])
            if key == "id":
                return f"/subscriptions/{sub}/resourceGroups/{group}/providers/Microsoft.KeyVault/vaults/{vault}"
            if key == "vault_uri":
                return f"https://{vault}.vault.azure.net/"
        if rtype == "azurerm_key_vault_secret":
            vault_ref = _ref_of(body["key_vault_id"])
            vault = self.body("azurerm_key_vault", vault_ref[1])
            vault_name, secret = self.resolve(vault["name"]), self.resolve(body["name"])
            vault_id = self.attribute("azurerm_key_vault", vault_ref[1], ["id"])
            if key == "versionless_id":
                return f"https://{vault_name}.vault.azure.net/secrets/{secret}"
            if key == "resource_versionless_id":
                return f"{vault_id}/secrets/{secret}"
            if key in ("id", "resource_id", "version"):
                version = hashlib.sha256(f"{vault_name}/{secret}".encode()).hexdigest()[:32]
                return {"id": f"https://{vault_name}.vault.azure.net/secrets/{secret}/{version}",
                        "resource_id": f"{vault_id}/secrets/{secret}/versions/{version}", "version": version}[key]
        if rtype == "azurerm_linux_virtual_machine":
            if key in ("identity.0.principal_id", "identity.principal_id"):
                return str(uuid.uuid5(uuid.NAMESPACE_URL, f"principal/{self.resolve(body['name'])}"))
            if key == "id":
                group = self.resolve(body["resource_group_name"])
                return (f"/subscriptions/{sub}/resourceGroups/{group}/providers/Microsoft.Compute/"
                        f"virtualMachines/{self.resolve(body['name'])}")
            if key == "virtual_machine_id":
                return str(uuid.uuid5(uuid.NAMESPACE_URL, f"vm/{self.resolve(body['name'])}"))
        if rtype == "tls_private_key":
            private, public = self.inputs.tls_key(name)
            if key == "private_key_openssh":
                return private
            if key == "public_key_openssh":
                return public.strip() + "\n"  # the provider ends it with a newline
        if rtype == "aws_s3_bucket" and key in ("id", "bucket"):
            return self.resolve(body["bucket"])
        if rtype == "aws_s3_bucket" and key == "arn":
            return f"arn:aws:s3:::{self.resolve(body['bucket'])}"
        if rtype == "aws_iam_role" and key in ("name", "id"):
            return self.resolve(body["name"])
        if rtype == "aws_iam_role" and key == "arn":
            return f"arn:aws:iam::{self.inputs.aws_account_id}:role/{self.resolve(body['name'])}"
        if rtype == "aws_iam_instance_profile" and key == "arn":
            return f"arn:aws:iam::{self.inputs.aws_account_id}:instance-profile/{self.resolve(body['name'])}"
        if rtype == "aws_kms_key" and key in ("arn", "key_id", "id"):
            key_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"kms/{name}"))
            region = self.provider("aws").get("region", "us-east-1")
            return key_id if key != "arn" else f"arn:aws:kms:{region}:{self.inputs.aws_account_id}:key/{key_id}"
        if rtype == "aws_eip" and key == "public_ip":
            return self._eips[name]
        return None

    def _data_attribute(self, rtype: str, name: str, body: dict, key: str) -> Any:
        if rtype == "aws_caller_identity" and key == "account_id":
            return self.inputs.aws_account_id
        if rtype == "aws_partition" and key == "partition":
            return "aws"
        if rtype == "aws_region" and key in ("name", "region"):
            return self.provider("aws").get("region", "us-east-1")
        if rtype == "azurerm_client_config":
            return {"tenant_id": self.inputs.azure_tenant_id, "object_id": self.inputs.azure_deployer_object_id,
                    "subscription_id": self.inputs.azure_subscription_id}.get(key)
        if rtype == "aws_iam_policy_document" and key == "json":
            return json.dumps(self.policy_document(name))
        return None

    def policy_document(self, name: str) -> dict:
        """``data.aws_iam_policy_document.<name>.json`` as the aws provider renders it (the
        statement fields the stacks use: sid, effect, actions, resources, principals, conditions)."""
        body = self.body("aws_iam_policy_document", name, data=True)
        statements = []
        for raw in self.resolve(body.get("statement", [])):
            statement: dict[str, Any] = {}
            if raw.get("sid"):
                statement["Sid"] = raw["sid"]
            statement["Effect"] = raw.get("effect", "Allow")
            statement["Action"] = _one_or_list(raw.get("actions", []))
            if raw.get("resources"):
                statement["Resource"] = _one_or_list(raw["resources"])
            for principal in raw.get("principals", []):
                statement.setdefault("Principal", {})[principal["type"]] = _one_or_list(principal["identifiers"])
            for condition in raw.get("condition", []):
                statement.setdefault("Condition", {}).setdefault(condition["test"], {})[
                    condition["variable"]] = _one_or_list(condition["values"])
            statements.append(statement)
        return {"Version": "2012-10-17", "Statement": statements}

    # -- outputs (``cdktf output --outputs-file``) -----------------------------------------------

    def outputs(self, *names: str) -> dict[str, Any]:
        """The named stack outputs after apply (``{name: value}``), as ``cdktf output`` lists them."""
        declared = self.stack.get("output", {})
        missing = [n for n in names if n not in declared]
        if missing:
            raise LabError(f"the stack has no output {missing}; it has {sorted(declared)}")
        return {name: self.resolve(declared[name]["value"]) for name in names}


def _one_or_list(values: list) -> Any:
    return values[0] if len(values) == 1 else values


def _ref_of(expression: str) -> tuple[str, str]:
    match = re.fullmatch(r"\$\{([a-z0-9_]+)\.([A-Za-z0-9_-]+)\.[a-z_]+\}", expression)
    if not match:
        raise LabError(f"expected a reference like ${{type.name.id}}, got {expression!r}")
    return match.group(1), match.group(2)


def ref_name(expression: str) -> tuple[str, str]:
    """``("azurerm_key_vault_secret", "hub_identity_...")`` of ``${azurerm_key_vault_secret.hub_identity_....x}``."""
    return _ref_of(expression)


def _split_args(text: str) -> list[str]:
    args, depth, current, quoted = [], 0, "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if not quoted:
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                args.append(current)
                current = ""
                continue
        current += ch
    if current.strip():
        args.append(current)
    return args
