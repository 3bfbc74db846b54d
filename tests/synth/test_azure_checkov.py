"""checkov on the Azure hub stack: every failed check has a written reason in checkov/azure.yaml,
and every reason there still matches a failure."""

from __future__ import annotations

import pytest

from tests.static.checkov_support import unexplained_failures

pytestmark = pytest.mark.synth


def test_checkov_finds_nothing_unexplained_on_the_azure_stack(example):
    stack_json = example.outdir / "stacks" / "weu-azure" / "cdk.tf.json"
    unexplained, stale, _ = unexplained_failures(stack_json, "azure")
    assert unexplained == [], "failed checks without a reason in checkov/azure.yaml:\n" + "\n".join(
        f"  {f.check_id} {f.name} ({f.resource})" for f in unexplained)
    assert stale == [], f"suppressions in checkov/azure.yaml that match no failure any more: {stale}"
