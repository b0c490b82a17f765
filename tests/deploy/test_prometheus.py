"""deploy/prometheus against the real promtool and a real Prometheus server on 127.0.0.1.

promtool validates the config and the rules and runs the alert unit tests (alerts_test.yml);
a Prometheus started with deploy/prometheus/prometheus.yml (targets rewritten to this test's
ports) scrapes a process exporting cluster.metrics.Metrics with every metric set, and every
alexnet query of the Grafana dashboard must return data, every alert rule must evaluate without
error. The same check against a real `ray job submit` run (Ray's metrics included) is in
tests/e2e/test_ray_job.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.metrics import exported_names
from tests.deploy import promql
from tests.deploy.services import (
    PROMETHEUS_YML,
    Prometheus,
    prometheus_config,
    require_binary,
    spawn,
    stop,
    wait_for,
)
from tests.deploy.standin_exporter import RAY_GPU_GAUGES

ROOT = Path(__file__).resolve().parents[2]
ALERTS_TEST = Path(__file__).with_name("alerts_test.yml")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_binary("promtool"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_check_config():
    r = promtool("check", "config", str(PROMETHEUS_YML))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_promtool_check_rules():
    r = promtool("check", "rules", str(promql.ALERTS))
    assert r.returncode == 0, r.stdout + r.stderr
    n = sum(len(g["rules"]) for g in yaml.safe_load(promql.ALERTS.read_text())["groups"])
    assert f"SUCCESS: {n} rules found" in r.stdout


def test_alert_rules_fire_on_their_cases(tmp_path):
    """`promtool test rules`: each alert fires when it should and not on a healthy run."""
    # promtool compares annotations verbatim; the logic is what is under test here (the
    # annotation templates are checked by `promtool check rules` above).
    rules = yaml.safe_load(promql.ALERTS.read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    cases = yaml.safe_load(ALERTS_TEST.read_text())
    cases["rule_files"] = ["alerts.yml"]
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(cases))
    tested = {t["alertname"] for case in cases["tests"] for t in case["alert_rule_test"]}
    assert tested == set(promql.alert_exprs()), "every alert needs a promtool case"
    r = promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@pytest.fixture
def standin(tmp_path):
    """A process serving cluster.metrics.Metrics with every metric set, and Ray's per-node GPU gauges;
    yields the two ports."""
    log = tmp_path / "standin.log"
    proc = spawn([sys.executable, "-m", "tests.deploy.standin_exporter", "--ray-gpus"], log, cwd=ROOT)
    try:
        ports = wait_for("the stand-in exporter's ports", lambda: log.read_text().split()[1], 60, log=log)
        yield int(log.read_text().split()[0]), int(ports)
    finally:
        stop(proc)


def served(expr: str) -> bool:
    """Whether the stand-in serves every metric ``expr`` names (Ray's CPU and actor series it does not:
    tests/e2e/test_ray_job.py checks those against a real Ray)."""
    ray_gpus = {f"ray_{n}" for n in RAY_GPU_GAUGES}
    return promql.metric_names(expr) <= exported_names() | ray_gpus


def test_prometheus_scrapes_metrics_every_dashboard_query_has_data(tmp_path, standin):
    port, ray_port = standin
    sd = tmp_path / "ray_sd.json"
    sd.write_text(json.dumps([{"targets": [f"127.0.0.1:{ray_port}"], "labels": {}}]))
    config = prometheus_config(tmp_path, f"127.0.0.1:{port}", ray_sd_file=sd, interval="500ms")
    r = promtool("check", "config", str(config))
    assert r.returncode == 0, r.stdout + r.stderr
    start = time.time()
    prom = Prometheus(require_binary("prometheus"), config, tmp_path)
    try:
        wait_for(
            "the alexnet and ray targets to be up",
            lambda: len([t for t in prom.api("targets")["activeTargets"] if t["health"] == "up"]) == 2,
            60,
            log=prom.log,
        )
        exprs = [promql.grafana_to_promql(e) for e in promql.dashboard_exprs() if served(e)]
        assert len(exprs) >= 20
        # issue 24: GPU utilisation and memory from Ray's per-node gauges, and the run's ETA
        gpu = [e for e in exprs if promql.metric_names(e) & {f"ray_{n}" for n in RAY_GPU_GAUGES}]
        assert {n for e in gpu for n in promql.metric_names(e)} == {f"ray_{n}" for n in RAY_GPU_GAUGES}
        assert any("alexnet_total_steps" in promql.metric_names(e) for e in exprs)

        def missing() -> list[str]:
            return [e for e in exprs if not prom.has_data(e, start)]

        wait_for("data for every dashboard query", lambda: not missing(), 60, log=prom.log)
        # The ETA panel's answer: 10,000 steps, the stand-in's 5 steps/s (0.2 s per step).
        (eta,) = [e for e in exprs if "alexnet_total_steps" in e]
        value = float(prom.api("query", query=eta)["result"][0]["value"][1])
        assert 1000 < value < 3000, value
        # The dashboard's `run` variable: label_values(alexnet_run_info, run).
        assert {m.get("run") for m in prom.series("alexnet_run_info", start)} == {"standin"}
        # The legends show labels the series really carry.
        targets = [t for t in promql.dashboard_targets() if promql.grafana_to_promql(t["expr"]) in exprs]
        assert not prom.missing_legend_labels(targets, start)
        # The stand-in sets every series, so the `or vector(0)` fallbacks are not what answered.
        for e in exprs:
            if " or vector(0)" in e:
                assert prom.has_data(e.split(" or vector(0)")[0], start), e

        # Every alert rule loaded and evaluated without error (e.g. no many-to-many matches).
        def rules() -> list[dict]:
            got = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
            return got if got and all(r.get("lastEvaluation", "").startswith("2") for r in got) else []

        got = wait_for("the alert rules to be evaluated", rules, 30, log=prom.log)
        assert {r["name"] for r in got} == set(promql.alert_exprs())
        bad = {r["name"]: r.get("lastError") for r in got if r["health"] != "ok"}
        assert not bad, bad
        # The stand-in keeps adding restarts and skipped samples: those alerts must be firing.
        expected = {"AlexNetRestarted", "AlexNetSkippingSamples", "AlexNetDataWorkerRestarts"}

        def firing() -> set[str]:
            return {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"] if a["state"] == "firing"}

        wait_for(f"alerts {sorted(expected)} to fire", lambda: expected <= firing(), 30, log=prom.log)
        assert not firing() & {"AlexNetLossNaN", "AlexNetFailed", "AlexNetTrainingStalled"}, firing()
    finally:
        prom.close()
