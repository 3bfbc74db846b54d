"""checkov on the Azure hub stacks (the example, and the monitoring variant of tests/helpers.py with
its action group and scrape rule): every failed check has a written reason in checkov/azure.yaml,
and every reason there still matches a failure."""

from __future__ import annotations

import pytest

from tests.helpers import monitoring_text
from tests.static.checkov_support import unexplained_failures

pytestmark = pytest.mark.synth


def test_checkov_finds_nothing_unexplained_on_the_azure_stack(example, synth_spec):
    unexplained, stale, _ = unexplained_failures(example.outdir / "stacks" / "weu-azure" / "cdk.tf.json", "azure")
    monitoring = synth_spec(text=monitoring_text()).outdir / "stacks" / "mon-azure" / "cdk.tf.json"
    more, more_stale, _ = unexplained_failures(monitoring, "azure")
    unexplained += more
    stale = sorted(set(stale) & set(more_stale))
    assert unexplained == [], "failed checks without a reason in checkov/azure.yaml:\n" + "\n".join(
        f"  {f.check_id} {f.name} ({f.resource})" for f in unexplained)
    assert stale == [], f"suppressions in checkov/azure.yaml that match no failure any more: {stale}"
