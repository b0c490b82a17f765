"""``bench/gpu_check.py --device cpu``: the GPU check's every section runs on CPU and its JSON holds
what the GPU run will be read for (the script must not die halfway on the first GPU it meets).

It runs as on the bare GPU machine: ``ray`` and ``webdataset`` unimportable (modules that raise
ImportError, first on the path of the check and of every process it spawns).

The check takes ~30 s of one core (one torch thread, as on the GPU machine's CPU side), most of it
Inductor compiling a step. Under ``make test`` (pytest-xdist) it is the first test of the worker
without Ray, beside the tests on Ray (tests/streams.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = (
    "env",
    "lrn",
    "engine_vs_cpu",
    "throughput",
    "syncs",
    "lrn_share",
    "multi_gpu",
    "deterministic",
    "decode",
    "step_path",
)
ABSENT = ("ray", "webdataset")  # not on the GPU machine


def _without(tmp_path: Path) -> Path:
    """A folder of modules named ``ABSENT`` whose import fails, as a missing package's does."""
    for name in ABSENT:
        (tmp_path / f"{name}.py").write_text(f'raise ImportError("no module named {name} (absent here)")\n')
    return tmp_path


def test_gpu_check_runs_every_section_on_cpu_without_ray_or_webdataset(tmp_path):
    stubs = _without(tmp_path)
    env = {**os.environ, "PYTHONPATH": f"{stubs}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    for name in ABSENT:  # the stubs work: the package cannot be imported
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True)
        assert probe.returncode != 0
    proc = subprocess.run(
        # a budget above the GPU's 450 s: on a busy CPU the compiled step takes minutes to build
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--budget-s", "900"],
        capture_output=True,
        text=True,
        timeout=980,
        env=env,
        cwd=ROOT,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    out = json.loads(lines[-1])  # one JSON line, last
    assert out["failed"] == [], (out["failed"], proc.stderr[-3000:])
    assert proc.returncode == 0
    assert set(SECTIONS) <= set(out) and out["device"] == "cpu"
    lrn = out["lrn"]
    assert lrn["gradcheck_eager"] is True and lrn["eager_vs_cpu_rel_error"] < 1e-6 and lrn["ok"]
    e = out["engine_vs_cpu"]
    assert e["ok"] and e["grad_rel_error"] == 0.0 and len(e["losses"]) == 2  # CPU against itself
    for prec in ("fp32", "bf16"):
        t = out["throughput"][prec]
        assert t["images_per_s"] > 0 and t["torchvision_images_per_s"] > 0 and t["tflops"] > 0
        assert t["engine_precision"] == prec
        assert out["syncs"][prec]["counted"] == 0, out["syncs"][prec]["ops"]
    assert out["throughput"]["gflop_per_image"] > 0
    assert 0 < out["lrn_share"]["lrn_share"] < 1
    assert out["multi_gpu"]["skipped"].startswith("no GPU")
    assert out["deterministic"]["ok"] and out["deterministic"]["max_abs_diff"] == 0.0
    d = out["decode"]  # on CPU: the same decoder against itself
    assert d["images_per_s"] > 0 and d["max_abs_diff_vs_cpu"] == 0 and d["bad_rows"] == 0
    assert d["jpeg_bytes_per_image"] < d["decoded_bytes_per_image"]
    p = out["step_path"]  # feed (device side), decode of 256 px JPEGs, engine step: eager and compiled
    assert p["jpeg_side"] == 256 and p["steps"] > 0
    for mode in ("eager", "compiled"):
        r = p[mode]
        assert r["engine_precision"] == "bf16"
        assert r["path_images_per_s"] > 0 and r["engine_images_per_s"] > 0 and r["path_over_engine"] > 0
        assert r["engine_host_ms_per_step"] > 0 and r["engine_device_ms_per_step"] > 0
        assert r["host_over_device"] == 1.0  # on CPU the host's time is the step's
    assert p["compiled_speedup"] > 0
    assert p["cudagraphs"]["skipped"].startswith("CUDA graphs need CUDA")  # CUDA only; "on" here
    assert all(out[s]["seconds"] >= 0 for s in SECTIONS)


def test_a_part_that_failed_alone_is_named_in_failed_and_the_section_kept():
    sys.path.insert(0, str(ROOT))
    from bench.gpu_check import Budget, run_section

    out: dict = {"failed": []}
    run_section("step_path", lambda: {"eager": {"ok": 1}, "failed": ["cudagraphs"]}, 30, Budget(60), out)
    assert out["failed"] == ["step_path.cudagraphs"] and out["step_path"]["eager"] == {"ok": 1}
