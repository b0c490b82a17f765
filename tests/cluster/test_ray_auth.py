"""Ray's version and token authentication (issue 24): the project requires the Ray that has it,
`alexnet train` attached to a cluster whose authentication is off says so (the risk and the fix),
and the embedded local Ray starts with it on.

The two runs of real Ray happen in subprocesses with their own HOME (the local Ray writes its token
to ~/.ray/auth_token), so neither touches the session's shared local Ray nor the user's token.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cluster.config import tomllib
from cluster.job import RAY_TOKEN_AUTH, auth_warning, check_ray_version

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_requires_the_ray_with_token_authentication():
    import ray

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [d for d in deps if d.startswith("ray")]
    assert req == f"ray[default]>={RAY_TOKEN_AUTH}" and RAY_TOKEN_AUTH == "2.52"
    check_ray_version(ray.__version__)  # what is installed here has it


@pytest.mark.parametrize("old", ["2.40.0", "2.51.2"])
def test_an_older_ray_is_refused_with_the_fix(old):
    with pytest.raises(ValueError) as e:
        check_ray_version(old)
    assert f"ray {old} is installed" in str(e.value)
    assert "pip install -U 'ray[default]>=2.52'" in str(e.value)
    check_ray_version("2.52.0")


def test_the_auth_warning_names_the_risk_and_the_fix():
    assert auth_warning("token", "the cluster") is None
    w = auth_warning("disabled", "the Ray cluster at 10.0.0.1:6379")
    assert w.startswith(
        "[alexnet] warning: the Ray cluster at 10.0.0.1:6379 runs without token authentication"
    )
    assert "run code there" in w and "RAY_AUTH_MODE=token" in w and "ray get-auth-token --generate" in w


def test_the_embedded_local_ray_is_started_with_token_auth(monkeypatch):
    """Whatever the installed Ray's default (off before 2.59), init_ray asks for it."""
    import ray

    from cluster.config import load_config
    from cluster.job import init_ray

    seen = {}
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(mode=os.environ.get("RAY_AUTH_MODE"), **kw))
    monkeypatch.setattr("cluster.job._refresh_ray_config", lambda: seen.update(refreshed=True))

    class Plan:
        data_workers = 2

    init_ray(load_config(preset="demo"), Plan())
    assert seen["mode"] == "token" and seen["refreshed"] and seen["address"] == "local"


def _run(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    clean.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=240,
        env=clean,
        cwd=ROOT,
    )


@pytest.mark.ray
def test_real_ray_attached_without_auth_warns_once_and_local_has_it(tmp_path, ray_local_shutdown):
    attach = """
        import os
        from ray.cluster_utils import Cluster
        import ray
        from cluster.config import load_config
        from cluster.job import init_ray
        Plan = type("Plan", (), {"data_workers": 1})
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            os.environ["RAY_ADDRESS"] = cluster.address
            init_ray(load_config(preset="demo"), Plan())
            print("attached", ray.is_initialized(), flush=True)
            ray.shutdown()
        finally:
            cluster.shutdown()
    """
    r = _run(attach, tmp_path, RAY_AUTH_MODE="disabled")
    assert r.returncode == 0, r.stdout + r.stderr
    warnings = [line for line in r.stdout.splitlines() if line.startswith("[alexnet] warning:")]
    assert len(warnings) == 1, r.stdout
    assert "runs without token authentication (RAY_AUTH_MODE=disabled)" in warnings[0]
    assert "run code there" in warnings[0] and "export RAY_AUTH_MODE=token" in warnings[0]
    assert "attached True" in r.stdout

    local = """
        import os
        import ray
        from ray._raylet import AuthenticationMode, get_authentication_mode
        from cluster.config import load_config
        from cluster.job import init_ray
        Plan = type("Plan", (), {"data_workers": 1})
        cfg = load_config(preset="demo", overrides={"grid.shape": "1x1x1", "grid.microbatches": 1})
        init_ray(cfg, Plan())
        mode = ray.get(ray.remote(lambda: os.environ.get("RAY_AUTH_MODE")).remote())
        print("local", get_authentication_mode() == AuthenticationMode.TOKEN, mode, flush=True)
        ray.shutdown()
    """
    r = _run(local, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "local True token" in r.stdout and "[alexnet] warning" not in r.stdout, r.stdout
    assert (tmp_path / ".ray" / "auth_token").stat().st_size > 0  # the token ray.init made
