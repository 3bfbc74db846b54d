"""Alert timing derived from the hub's load balancer probe settings, shared by both clouds
(docs/azure.md and docs/aws.md, "Alerts", show the same formula).

The load balancer takes a proxy out of a route after ``proxies.probe_threshold`` failed probes,
``proxies.probe_interval_s`` apart: its detection time is ``D = interval × threshold``. Both
clouds' load balancer metrics have a one-minute grain (Azure: Microsoft.Network/loadBalancers
time grain PT1M; AWS/NetworkELB: 60-second periods), so an alert looks at a window of

    W = max(60, ceil(D / 60) × 60) seconds

— the detection time rounded up to whole metric minutes. An outage of D plus one minute
therefore falls into one alert evaluation (the frequency is one minute), and a probe blip the
load balancer itself rides out (shorter than D) does not page anyone on Azure, where the probe
metric is the raw probe result. Azure accepts only some window sizes: the smallest one at least
W is taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tunnelhub import spec as S

METRIC_GRAIN_S = 60
AZURE_WINDOWS = {60: "PT1M", 300: "PT5M", 900: "PT15M", 1800: "PT30M", 3600: "PT1H", 21600: "PT6H",
                 43200: "PT12H", 86400: "P1D"}
"""azurerm 4.55.0 monitor_metric_alert ``window_size``: PT1M, PT5M, PT15M, PT30M, PT1H, PT6H, PT12H
or P1D (its ``frequency``, PT1M..PT1H, must not exceed it)."""
AZURE_FREQUENCY = "PT1M"
ABANDONED_PERIOD_S = 300
"""The slot Lambda's abandoned-launch alarm: any abandoned launch in five minutes (a launch the
hook abandons is retried by Auto Scaling, and each retry logs its own decision)."""
METRIC_NAMESPACE = "tunnelhub"
ABANDONED_METRIC = "AbandonedLaunches"


@dataclass(frozen=True)
class AlertTiming:
    detection_s: int
    """D: how long the load balancer needs to take a failing proxy out of a route."""
    window_s: int
    """W: the alert's evaluation window (whole metric minutes, at least D)."""

    @property
    def evaluation_periods(self) -> int:
        """AWS: W in 60-second periods."""
        return self.window_s // METRIC_GRAIN_S

    @property
    def azure_window(self) -> str:
        """Azure: the smallest allowed window_size of at least W."""
        return AZURE_WINDOWS[min(w for w in AZURE_WINDOWS if w >= self.window_s)]


def alert_timing(hub: S.Hub) -> AlertTiming:
    detection = hub.proxies.probe_interval_s * hub.proxies.probe_threshold
    window = max(METRIC_GRAIN_S, math.ceil(detection / METRIC_GRAIN_S) * METRIC_GRAIN_S)
    return AlertTiming(detection_s=detection, window_s=min(window, max(AZURE_WINDOWS)))
