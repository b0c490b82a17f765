"""A user's whole path on a real Ray cluster: token auth, `ray job submit`, Prometheus, resume.

One real Ray head (`ray start --head` on 127.0.0.1, token authentication on, its own temp dir
and ports), the demo dataset built with `alexnet shards --synthetic`, and a real Prometheus
started from deploy/prometheus/prometheus.yml (targets rewritten to this test's ports; Ray's
metrics through the head's service-discovery file):

1. without the token the job API refuses;
2. `ray job submit --working-dir . --runtime-env deploy/runtime_env.yaml -- alexnet train
   --preset demo ...` runs to SUCCEEDED; `ray job logs` shows progress lines and the
   checkpoint path; while it runs, every PromQL expression of the Grafana dashboard returns
   data from Prometheus;
3. resubmitting with `--resume` and a longer `--steps` continues from the last checkpoint's
   step (no progress line before it); `ray job stop` then stops it with a final checkpoint
   at the step reached (the grace period comes from deploy/runtime_env.yaml).

Every process started here is stopped by PID in a ``finally``, also when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.deploy import promql
from tests.deploy.services import (
    Prometheus,
    free_port,
    http_get,
    prometheus_config,
    require_binary,
    spawn,
    stop,
    wait_for,
)
from tests.deploy.standin_exporter import RAY_GPU_GAUGES

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
N_IMAGES = 320  # 288 train (9 steps of 32 per epoch) + 32 val
# Run 1 crosses two epoch ends (evaluation, checkpoints at 9 and 18: the coordinator's
# endpoint lives long enough after them to be scraped) and stops inside epoch 2, so run 2
# resumes mid-epoch, from the data position in the checkpoint. Run 2 is long; `ray job stop`
# ends it soon after it has shown progress.
STEPS_1, STEPS_2 = 22, 900

pytestmark = [pytest.mark.e2e, pytest.mark.ray]


def ray_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


class RayHead:
    """`ray start --head --block` with token auth, in its own temp dir, on free ports."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        # Short path: Ray's Unix sockets live under the temp dir (108-byte limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))
        self.dashboard_port = free_port()
        self.metrics_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.log = work / "ray-head.log"
        argv = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
        argv += ["--port", str(free_port()), "--temp-dir", str(self.temp_dir / "ray")]
        argv += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1"]
        argv += [
            "--dashboard-port",
            str(self.dashboard_port),
            "--metrics-export-port",
            str(self.metrics_port),
        ]
        # Every fixed default port moved, so Rays of other tests on this machine never collide.
        for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port"):
            argv += [flag, str(free_port())]
        argv += ["--runtime-env-agent-port", str(free_port()), "--ray-client-server-port", str(free_port())]
        argv += ["--num-cpus", "8", "--disable-usage-stats"]
        self.proc = spawn(argv, self.log, env=env)

    @property
    def sd_file(self) -> Path:
        return self.temp_dir / "ray" / "prom_metrics_service_discovery.json"

    def close(self) -> None:
        try:
            stop(self.proc, grace_s=20)
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def job_status(head: RayHead, auth: dict[str, str], job: str) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED, from the job REST API."""
    return json.loads(http_get(f"{head.address}/api/jobs/{job}", timeout=10, headers=auth))["status"]


def job_logs(head: RayHead, auth: dict[str, str], job: str) -> str:
    """The job's driver output so far, from the job REST API."""
    return json.loads(http_get(f"{head.address}/api/jobs/{job}/logs", timeout=10, headers=auth))["logs"]


def submit(
    env: dict[str, str], head: RayHead, job: str, *train_args: str, wait: bool
) -> subprocess.CompletedProcess:
    argv = ["job", "submit", "--address", head.address, "--submission-id", job, "--working-dir", str(ROOT)]
    argv += ["--runtime-env", str(ROOT / "deploy" / "runtime_env.yaml")]
    argv += [] if wait else ["--no-wait"]
    argv += ["--", "alexnet", "train", "--preset", "demo", *train_args]
    return ray_cli(env, *argv, timeout=420)


def test_submit_monitor_and_resume_demo_on_a_ray_head(tmp_path, ray_local_shutdown):
    # Outside CI the Ray part runs without Prometheus, and the test ends skipped saying so.
    prometheus_bin = shutil.which("prometheus")
    if prometheus_bin is None and os.environ.get("CI", "").lower() == "true":
        require_binary("prometheus")  # fails the test: CI installs it (.ci/run)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        HOME=str(home),  # the token lives in $HOME/.ray/auth_token, as for a user
        PATH=f"{BIN}:{env.get('PATH', '')}",  # the project installed on the "node"
        RAY_AUTH_MODE="token",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_worker_niceness="0",  # as every Ray of the suite (tests/conftest.py)
        OMP_NUM_THREADS="1",
    )
    r = ray_cli(env, "get-auth-token", "--generate")
    assert r.returncode == 0, r.stderr
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert token and r.stdout.strip() == token

    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    argv = [str(BIN / "alexnet"), "shards", "--synthetic", str(N_IMAGES), str(shards), "--quiet"]
    r = subprocess.run(argv + ["--workers", "1"], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr

    head = RayHead(tmp_path, env)
    prom = None
    try:
        auth = {"Authorization": f"Bearer {token}"}
        wait_for(
            "the Ray job API", lambda: http_get(f"{head.address}/api/jobs/", headers=auth), 120, log=head.log
        )
        # Token auth is really on: no token, no job API (the CLI says so too).
        with pytest.raises(Exception, match="401"):
            http_get(f"{head.address}/api/jobs/")
        no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
        r = ray_cli(no_token, "job", "list", "--address", head.address)
        assert r.returncode != 0 and "Authentication" in r.stdout + r.stderr

        # --- run 1, watched by Prometheus -------------------------------------------------
        # The demo preset serves its metrics on a free port (metrics.port = 0) and logs the URL;
        # Prometheus is pointed at it once it is known (no port picked here that could be taken).
        common = ["--data", str(shards), "--run-dir", str(run_dir)]
        r = submit(env, head, "e2e-run-1", *common, "--steps", str(STEPS_1), wait=False)
        assert r.returncode == 0, r.stdout + r.stderr
        if prometheus_bin:

            def metrics_target() -> str | None:
                logs = job_logs(head, auth, "e2e-run-1")
                m = re.search(r"metrics at http://([\d.]+:\d+)/metrics", logs)
                if m is None and job_status(head, auth, "e2e-run-1") in ("FAILED", "STOPPED", "SUCCEEDED"):
                    pytest.fail(f"run 1 ended before serving metrics:\n{logs[-4000:]}")
                return m.group(1) if m else None

            target = wait_for("the job's metrics endpoint in its log", metrics_target, 300, every_s=1)
            config = prometheus_config(tmp_path, target, head.sd_file, interval="500ms")
            wait_for("Ray's service-discovery file", head.sd_file.exists, 60, log=head.log)
            start = time.time()
            prom = Prometheus(prometheus_bin, config, tmp_path)
        # Ray exports its GPU gauges only from nodes with GPUs: on a CPU-only machine the GPU panels
        # are checked against a stand-in with Ray's labels instead (tests/deploy/test_prometheus.py)
        gpu_names = set() if torch.cuda.is_available() else {f"ray_{n}" for n in RAY_GPU_GAUGES}
        targets = [t for t in promql.dashboard_targets() if not promql.metric_names(t["expr"]) & gpu_names]
        exprs = [promql.grafana_to_promql(t["expr"]) for t in targets]
        missing = list(exprs)
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            status = job_status(head, auth, "e2e-run-1")
            if prom is not None:
                missing = [e for e in missing if not prom.has_data(e, start)]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(0.5)
        logs = ray_cli(env, "job", "logs", "--address", head.address, "e2e-run-1").stdout
        assert status == "SUCCEEDED", f"run 1 ended {status}:\n{logs[-4000:]}"
        if prom is not None:
            missing = [e for e in missing if not prom.has_data(e, start)]
            assert not missing, f"dashboard queries without data: {missing}"
            # `or vector(0)` answers have no labels: their legends are fixed text.
            bad = prom.missing_legend_labels(targets, start)
            assert not bad, f"legends naming labels the series lack: {bad}"

        assert re.search(rf"^step \d+/{STEPS_1} ", logs, re.MULTILINE), logs[-3000:]
        ck1 = run_dir / "checkpoints" / f"step-{STEPS_1:08d}"
        assert f"latest checkpoint: {ck1}" in logs, logs[-3000:]
        assert (ck1 / "manifest.json").is_file()

        # --- run 2: the same command plus --resume and a longer run; `ray job stop` --------
        r = submit(env, head, "e2e-run-2", *common, "--steps", str(STEPS_2), "--resume", wait=False)
        assert r.returncode == 0, r.stdout + r.stderr

        def progressed() -> bool:
            logs = job_logs(head, auth, "e2e-run-2")
            if job_status(head, auth, "e2e-run-2") in ("FAILED", "STOPPED", "SUCCEEDED"):
                pytest.fail(f"run 2 ended before it was stopped:\n{logs[-4000:]}")
            return any(int(n) > STEPS_1 for n in re.findall(rf"^step (\d+)/{STEPS_2} ", logs, re.MULTILINE))

        wait_for("run 2 to log progress past the resumed step", progressed, 300, every_s=1)
        # The CLI waits until the job has stopped: SIGTERM, final checkpoint, exit (or SIGKILL
        # after RAY_JOB_STOP_WAIT_TIME_S from deploy/runtime_env.yaml).
        r = ray_cli(env, "job", "stop", "--address", head.address, "e2e-run-2", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        logs2 = ray_cli(env, "job", "logs", "--address", head.address, "e2e-run-2").stdout
        assert job_status(head, auth, "e2e-run-2") == "STOPPED", logs2[-3000:]
        assert f"resuming from {ck1} (step {STEPS_1})" in logs2, logs2[-3000:]
        steps_logged = [int(n) for n in re.findall(rf"^step (\d+)/{STEPS_2} ", logs2, re.MULTILINE)]
        assert steps_logged and min(steps_logged) > STEPS_1, (steps_logged, logs2[-3000:])
        m = re.search(r"stopped at step (\d+)", logs2)
        assert m, logs2[-3000:]
        stopped_at = int(m.group(1))
        assert max(steps_logged) <= stopped_at < STEPS_2
        manifest = run_dir / "checkpoints" / f"step-{stopped_at:08d}" / "manifest.json"
        assert json.loads(manifest.read_text())["step"] == stopped_at
    finally:
        if prom is not None:
            prom.close()
        head.close()
    if not prometheus_bin:
        pytest.skip(
            "the Ray job, logs and resume checks PASSED; the Prometheus checks did not run: "
            "`prometheus` is not installed (apt-get install prometheus)"
        )
