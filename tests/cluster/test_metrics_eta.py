"""The run's total steps are a metric from its start (issue 24), so a dashboard can show an ETA."""

from __future__ import annotations

from cluster.metrics import Metrics, exported_names
from cluster.plan import RunPlan
from cluster.reporting import Reporter


def test_total_steps_is_exported_from_the_start():
    assert "alexnet_total_steps" in exported_names()
    metrics = Metrics("r")
    report = Reporter(metrics, RunPlan(5, 504, 2, data_streams=2), 32, 10, log=print)
    report.begin(step=120, lr=0.01, state="starting")
    get = metrics.registry.get_sample_value
    assert get("alexnet_total_steps", {"run": "r"}) == 504
    assert get("alexnet_step", {"run": "r"}) == 120
