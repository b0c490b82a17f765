"""Real services for the deploy and end-to-end tests: start them, talk to them, stop them by PID.

Every process started here gets its own session; :func:`stop` ends it and every descendant it
had (found through /proc before and after the polite signal) by PID, within a bounded time,
so a failing test leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def require_binary(name: str) -> str:
    """Path of ``name``; a skip outside CI, a failure in CI (``CI=true``), when it is not installed."""
    path = shutil.which(name)
    if path:
        return path
    msg = f"`{name}` is not installed (Debian/Ubuntu: apt-get install prometheus)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{msg}; .ci/run installs it, so a CI machine without it is broken")
    pytest.skip(msg)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            # The command name may hold spaces and parentheses: the ppid follows the last ')'.
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out.extend(kids)
        frontier.extend(kids)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM ``proc``, wait up to ``grace_s``, then SIGKILL it and every descendant, by PID."""
    if proc.poll() is None:
        tree = children(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
        tree += children(proc.pid) if proc.poll() is None else []
    else:
        tree = []
    for pid in [proc.pid, *tree]:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.1)


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
    """Start ``argv`` in its own session, stdout and stderr into ``log``."""
    with open(log, "ab") as f:
        return subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> bytes:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def wait_for(what: str, check, timeout_s: float, every_s: float = 0.5, log: Path | None = None):
    """Call ``check()`` until it returns a truthy value; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except Exception as e:  # not up yet: keep the reason for the failure message
            last = e
        time.sleep(every_s)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last!r})\n{tail}")


def prometheus_config(
    out_dir: Path, alexnet_target: str, ray_sd_file: Path | None, interval: str = "1s"
) -> Path:
    """A copy of deploy/prometheus/prometheus.yml pointed at the test's ports, scraping every ``interval``."""
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    cfg["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
    cfg["rule_files"] = [str(PROMETHEUS_YML.parent / f) for f in cfg["rule_files"]]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    jobs["alexnet"]["static_configs"] = [{"targets": [alexnet_target]}]
    if ray_sd_file is None:
        cfg["scrape_configs"] = [j for j in cfg["scrape_configs"] if j["job_name"] != "ray"]
    else:
        jobs["ray"]["file_sd_configs"] = [{"files": [str(ray_sd_file)], "refresh_interval": interval}]
    path = out_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Prometheus:
    """A real Prometheus server on 127.0.0.1 with its HTTP API."""

    def __init__(self, binary: str, config: Path, work: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "prometheus.log"
        self.proc = spawn(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            self.log,
        )
        wait_for("Prometheus to be ready", lambda: http_get(f"{self.url}/-/ready"), 60, log=self.log)

    def api(self, path: str, **params: str) -> dict | list:
        q = urllib.parse.urlencode(params)
        body = json.loads(http_get(f"{self.url}/api/v1/{path}?{q}", timeout=10))
        assert body["status"] == "success", body
        return body["data"]

    def series(self, expr: str, start: float, end: float | None = None) -> list[dict[str, str]]:
        """The label sets of the series ``expr`` returned at any 1 s step in [start, end]."""
        end = end or time.time()
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1")
        return [s["metric"] for s in data["result"] if s["values"]]

    def has_data(self, expr: str, start: float, end: float | None = None) -> bool:
        """Whether ``expr`` returned at least one sample at any 1 s step in [start, end]."""
        return bool(self.series(expr, start, end))

    def missing_legend_labels(self, targets: list[dict], start: float) -> dict[str, set[str]]:
        """Grafana targets whose legend names a label none of their series carries: expr -> labels."""
        from tests.deploy.promql import grafana_to_promql, legend_labels

        bad = {}
        for t in targets:
            found = self.series(grafana_to_promql(t["expr"]), start)
            missing = {name for name in legend_labels(t) if not any(name in s for s in found)}
            if missing:
                bad[t["expr"]] = missing
        return bad

    def close(self) -> None:
        stop(self.proc)
