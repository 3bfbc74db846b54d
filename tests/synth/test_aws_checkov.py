"""checkov on the AWS hub stacks: every failed check has a written reason in checkov/aws.yaml, and
every reason there still matches a failure of at least one of the stacks (the example hub, the
two variants of test_aws_hub.py: NAT gateway egress, existing VPC, and the monitoring variant of
tests/helpers.py: SNS subscriptions, scrape CIDRs)."""

from __future__ import annotations

import pytest

from tests.static.checkov_support import load_suppressions, run_checkov
from tests.helpers import monitoring_text
from tests.synth.test_aws_hub import variants_text

pytestmark = pytest.mark.synth

# checkov's IAM checks read every policy document; the only one they may flag is the host key's KMS
# key policy (its account-administration statement, see checkov/aws.yaml).
IAM_CHECKS = ("CKV_AWS_109", "CKV_AWS_111", "CKV_AWS_356")
KMS_POLICY_PATH = "hub/host-key/kms-policy"


@pytest.fixture(scope="session")
def checkov_results(example, synth_spec):
    variants = synth_spec(text=variants_text())
    monitoring = synth_spec(text=monitoring_text())
    results = {}
    for synthesized, name in ((example, "use-aws"), (variants, "pvt-aws"), (variants, "exv-aws"),
                              (monitoring, "moa-aws")):
        stack_json = synthesized.outdir / "stacks" / name / "cdk.tf.json"
        passed, failed = run_checkov(stack_json)
        results[name] = (passed, failed, synthesized.stack(name))
    return results


def test_every_failed_check_has_a_written_reason(checkov_results):
    suppressions = load_suppressions("aws")
    for name, (_, failed, _) in checkov_results.items():
        unexplained = [f for f in failed if f.check_id not in suppressions]
        assert not unexplained, f"{name}: checkov failures without a reason in checkov/aws.yaml: {unexplained}"
        # (run_checkov's passed count is 0 under --quiet; the known findings show checkov read the stack)
        assert {"CKV2_AWS_19", "CKV_AWS_116"} <= {f.check_id for f in failed}, name


def test_no_stale_suppression(checkov_results):
    suppressions = load_suppressions("aws")
    seen = {f.check_id for _, failed, _ in checkov_results.values() for f in failed}
    assert sorted(set(suppressions) - seen) == []


def test_iam_findings_concern_the_kms_key_policy_only(checkov_results):
    for name, (_, failed, stack) in checkov_results.items():
        paths = {
            f"data.{logical}": body["//"]["metadata"]["path"].split("/", 1)[1]
            for logical, body in stack["data"]["aws_iam_policy_document"].items()
        }
        flagged = {(f.check_id, paths.get(f.resource, f.resource)) for f in failed if f.check_id in IAM_CHECKS}
        assert flagged == {(check, KMS_POLICY_PATH) for check in IAM_CHECKS}, name
