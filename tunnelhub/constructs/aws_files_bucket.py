"""The hub's files bucket: the hub configuration document, and the proxy files that do not fit
in EC2's 16 KB of user data.

The document (``config/hub-config.json``, :mod:`tunnelhub.userdata.document`) is one object at a
fixed key: a routine change (a route, a key) updates it in place and every proxy's reconciler
picks it up within its poll interval (a conditional GET: ETag), so the launch template never
changes for it. It holds no secret (routes, addresses, public keys).

The cloud-init renderer moves the largest file (the health daemon) here when even gzip does not
fit, and pins each object's sha256 in the user data: the proxy fetches ``tunnelhub-<hub>-<account>-
<region>/<key>`` with its instance role at boot and refuses a file whose digest differs, so the
bucket cannot change what runs on a proxy. Keys are content-addressed (``proxy/<sha256>/<name>``),
so a new file is a new object and a running proxy's files never change under it.

The objects are public source code (the repository's VM scripts), so the bucket uses S3-managed
encryption; it is private (public access blocked, owner-enforced), TLS-only, versioned, with old
versions expiring.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass

from cdktf import ITerraformDependable, TerraformResourceLifecycle
from cdktf_cdktf_provider_aws.data_aws_iam_policy_document import (
    DataAwsIamPolicyDocument,
    DataAwsIamPolicyDocumentStatement,
    DataAwsIamPolicyDocumentStatementCondition,
    DataAwsIamPolicyDocumentStatementPrincipals,
)
from cdktf_cdktf_provider_aws.s3_bucket import S3Bucket
from cdktf_cdktf_provider_aws.s3_bucket_lifecycle_configuration import (
    S3BucketLifecycleConfiguration,
    S3BucketLifecycleConfigurationRule,
    S3BucketLifecycleConfigurationRuleAbortIncompleteMultipartUpload,
    S3BucketLifecycleConfigurationRuleFilter,
    S3BucketLifecycleConfigurationRuleNoncurrentVersionExpiration,
)
from cdktf_cdktf_provider_aws.s3_bucket_ownership_controls import (
    S3BucketOwnershipControls,
    S3BucketOwnershipControlsRule,
)
from cdktf_cdktf_provider_aws.s3_bucket_policy import S3BucketPolicy
from cdktf_cdktf_provider_aws.s3_bucket_public_access_block import S3BucketPublicAccessBlock
from cdktf_cdktf_provider_aws.s3_bucket_server_side_encryption_configuration import (
    S3BucketServerSideEncryptionConfigurationA,
    S3BucketServerSideEncryptionConfigurationRuleA,
    S3BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultA,
)
from cdktf_cdktf_provider_aws.s3_bucket_versioning import (
    S3BucketVersioningA,
    S3BucketVersioningVersioningConfiguration,
)
from cdktf_cdktf_provider_aws.s3_object import S3Object
from constructs import Construct

from tunnelhub.userdata import AWS_DOCUMENT_KEY, HubDocument
from tunnelhub.userdata import S3Object as ProxyFile

NONCURRENT_VERSION_DAYS = 30


@dataclass(frozen=True, kw_only=True)
class FilesBucketProps:
    bucket_name: str
    """``tunnelhub-<hub>-<account>-<region>``: the name the proxies derive at boot."""
    document: HubDocument
    """The hub configuration document (``render_document(hub)``), uploaded to ``config/hub-config.json``."""
    files: Sequence[ProxyFile] = ()
    """The renderer's ``UserData.s3_objects`` (default: none, everything fits in the user data)."""
    key_prefix: str = "proxy/"
    """The prefix every file's key starts with: the instance role may read below it (and the document)."""


class FilesBucket(Construct):
    """Read-only attributes: ``bucket_name``, ``bucket_arn``, ``readable_arns`` (what the proxies'
    role may ``s3:GetObject``: the files' prefix and the document), ``document_key``, ``ready``
    (the objects and the bucket's settings, for ``depends_on``)."""

    def __init__(self, scope: Construct, id: str, props: FilesBucketProps):
        super().__init__(scope, id)
        outside = [f.key for f in props.files if not f.key.startswith(props.key_prefix)]
        if outside:
            raise ValueError(f"files bucket keys must start with {props.key_prefix!r}; got {', '.join(outside)}")
        bucket = S3Bucket(self, "bucket", bucket=props.bucket_name, force_destroy=True)
        self.bucket_name = props.bucket_name
        self.bucket_arn = bucket.arn
        self.document_key = AWS_DOCUMENT_KEY
        self.readable_arns = [f"{bucket.arn}/{props.key_prefix}*", f"{bucket.arn}/{AWS_DOCUMENT_KEY}"]
        block = S3BucketPublicAccessBlock(
            self, "public-access-block", bucket=bucket.id, block_public_acls=True, block_public_policy=True,
            ignore_public_acls=True, restrict_public_buckets=True,
        )
        ownership = S3BucketOwnershipControls(
            self, "ownership", bucket=bucket.id, rule=S3BucketOwnershipControlsRule(object_ownership="BucketOwnerEnforced"),
        )
        encryption = S3BucketServerSideEncryptionConfigurationA(
            self, "encryption", bucket=bucket.id,
            rule=[S3BucketServerSideEncryptionConfigurationRuleA(
                apply_server_side_encryption_by_default=(
                    S3BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultA(sse_algorithm="AES256")
                ),
            )],
        )
        versioning = S3BucketVersioningA(
            self, "versioning", bucket=bucket.id,
            versioning_configuration=S3BucketVersioningVersioningConfiguration(status="Enabled"),
        )
        S3BucketLifecycleConfiguration(
            self, "lifecycle", bucket=bucket.id,
            rule=[S3BucketLifecycleConfigurationRule(
                id="old-versions", status="Enabled", filter=[S3BucketLifecycleConfigurationRuleFilter(prefix="")],
                noncurrent_version_expiration=[
                    S3BucketLifecycleConfigurationRuleNoncurrentVersionExpiration(noncurrent_days=NONCURRENT_VERSION_DAYS)
                ],
                abort_incomplete_multipart_upload=[
                    S3BucketLifecycleConfigurationRuleAbortIncompleteMultipartUpload(days_after_initiation=7)
                ],
            )],
            depends_on=[versioning],
        )
        tls_only = DataAwsIamPolicyDocument(
            self, "policy-document",
            statement=[DataAwsIamPolicyDocumentStatement(
                sid="TlsOnly", effect="Deny", actions=["s3:*"], resources=[bucket.arn, f"{bucket.arn}/*"],
                principals=[DataAwsIamPolicyDocumentStatementPrincipals(type="*", identifiers=["*"])],
                condition=[DataAwsIamPolicyDocumentStatementCondition(
                    test="Bool", variable="aws:SecureTransport", values=["false"])],
            )],
        )
        policy = S3BucketPolicy(self, "policy", bucket=bucket.id, policy=tls_only.json, depends_on=[block])
        settings: list[ITerraformDependable] = [block, ownership, encryption, versioning, policy]
        objects_ns = Construct(self, "objects")
        self.ready: list[ITerraformDependable] = list(settings)
        for f in sorted(props.files, key=lambda f: f.key):
            self.ready.append(S3Object(
                objects_ns, f.path.rsplit("/", 1)[-1], bucket=bucket.id, key=f.key,
                content_base64=base64.b64encode(f.content).decode(), content_type="application/octet-stream",
                depends_on=settings,
                # The key changes with the content: upload the new object before deleting the old.
                lifecycle=TerraformResourceLifecycle(create_before_destroy=True),
            ))
        # The document: one key, updated in place (aws_s3_object's content is not ForceNew: a change
        # re-uploads the object); versioning keeps the previous documents for 30 days.
        self.document = S3Object(
            self, "hub-config", bucket=bucket.id, key=AWS_DOCUMENT_KEY, content=props.document.text,
            content_type="application/json", depends_on=settings,
        )
        self.ready.append(self.document)
