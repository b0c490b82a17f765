"""The files in deploy/ parse, agree with each other and with the project, and query only real metrics.

Images, ports and commands named in the configs are checked against what exists: the project's
own image (deploy/Dockerfile) or Ray's image at the installed Ray version; the metrics port of
the paper preset; `alexnet` subcommands through the real argument parser; `ray start` flags
through Ray's own click command. Every PromQL expression in the dashboard and the alert rules
names only metrics from cluster.metrics.exported_names() or Ray's own (ray_*).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest
import tomllib
import yaml

from cluster.metrics import exported_names
from tests.deploy import promql

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def paper_metrics() -> dict:
    return tomllib.loads((ROOT / "cluster" / "presets" / "paper.toml").read_text())["metrics"]


def walk(node, key: str):
    """Every value stored under ``key`` anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)


def containers(spec: dict) -> list[dict]:
    """The containers of every pod template in a manifest."""
    return [c for cs in walk(spec, "containers") for c in cs]


# ---------------------------------------------------------------------------- parsing


def test_every_yaml_in_deploy_parses():
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 9, files
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        assert docs, f"{f} holds no YAML document"


def test_kustomization_lists_existing_files():
    kust = load(KUBERAY / "kustomization.yaml")
    for res in kust["resources"]:
        assert (KUBERAY / res).is_file(), res


# ---------------------------------------------------------------------------- images


def allowed_images() -> set[str]:
    import ray

    return {f"rayproject/ray:{ray.__version__}-py311-gpu", f"alexnet-pipeline:{project_version()}"}


def test_images_exist_in_the_project():
    """Only Ray's image at the installed Ray version, or the project image built by deploy/Dockerfile."""
    allowed = allowed_images()
    dockerfile = (DEPLOY / "Dockerfile").read_text().splitlines()
    base = [line.split()[1] for line in dockerfile if line.startswith("FROM ")]
    assert base and set(base) <= allowed, base
    # The project image is what deploy/Dockerfile builds; its tag is the package version.
    assert f"-t REGISTRY/alexnet-pipeline:{project_version()}" in "\n".join(dockerfile)

    named = {load(DEPLOY / "ray-cluster.yaml")["docker"]["image"]}
    for f in KUBERAY.glob("*.yaml"):
        for doc in yaml.safe_load_all(f.read_text()):
            named |= set(walk(doc, "image"))
    assert named, "no image named in deploy/"
    assert named <= allowed, named - allowed


# ---------------------------------------------------------------------------- commands


@cache
def alexnet_parser() -> argparse.ArgumentParser:
    """The `alexnet` command's real parser, with every optional subcommand registered."""
    from alexnet import cli

    cli._load_optional()
    parser = argparse.ArgumentParser(prog="alexnet")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in dict.fromkeys(cli.SUBCOMMANDS):  # main() may have registered them already
        add(sub)
    return parser


def subcommands() -> set[str]:
    parser = alexnet_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


def check_alexnet_command(argv: list[str], where: str) -> None:
    """Parse an `alexnet ...` command line with the real parser; skip if its subcommand is not built yet."""
    assert argv[0] == "alexnet", argv
    if argv[1] not in subcommands():
        pytest.skip(f"`alexnet {argv[1]}` (named in {where}) is not registered yet: waits on its issue")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = alexnet_parser().parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse: {err.getvalue()}")
    assert callable(args.func)


def test_rayjob_entrypoint_is_a_real_command():
    job = load(KUBERAY / "rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["alexnet", "train", "--preset", "paper"], argv
    check_alexnet_command(argv, "rayjob.yaml")


def test_shards_job_is_a_real_command():
    job = load(KUBERAY / "shards-job.yaml")
    (c,) = containers(job["spec"])
    check_alexnet_command(c["command"] + c.get("args", []), "shards-job.yaml")


def ray_commands(shell: str) -> list[list[str]]:
    """The `ray ...` invocations in a shell line (after `;` and leading VAR=value assignments)."""
    out = []
    for part in shell.split(";"):
        argv = shlex.split(part)
        while argv and "=" in argv[0] and not argv[0].startswith("-"):
            argv = argv[1:]
        if argv and argv[0] == "ray":
            out.append(argv)
    return out


def test_ray_cluster_start_commands_parse_with_ray_cli():
    from ray.scripts.scripts import cli

    cfg = load(DEPLOY / "ray-cluster.yaml")
    seen = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for line in cfg[key]:
            for argv in ray_commands(line):
                cmd = cli.commands[argv[1]]
                ctx = cmd.make_context(argv[1], argv[2:])  # raises click.UsageError on a bad flag
                seen.append((key, argv[1], ctx.params))
    starts = {key: p for key, name, p in seen if name == "start"}
    assert set(starts) == {"head_start_ray_commands", "worker_start_ray_commands"}
    head, worker = starts["head_start_ray_commands"], starts["worker_start_ray_commands"]
    assert head["head"] and not worker["head"]
    # Dashboard / job API only on the head's loopback (reached through `ray dashboard`).
    assert head["dashboard_host"] == "127.0.0.1"
    assert head["metrics_export_port"] == worker["metrics_export_port"] == 8080
    assert head["num_gpus"] == 0


def test_ray_cluster_config_is_valid_for_ray_up():
    from ray.autoscaler._private.util import validate_config

    cfg = load(DEPLOY / "ray-cluster.yaml")
    validate_config(cfg)  # Ray's own JSON schema for `ray up`
    # Token auth on every node: the mode on every `ray start`, the token file on every node.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [line for line in cfg[key] if "ray start" in line]
        assert starts and all("RAY_AUTH_MODE=token " in line for line in starts), starts
    assert "/home/ray/.ray/auth_token" in cfg["file_mounts"]
    # Shared storage at the path the docs and the KubeRay manifests use.
    assert "-v /mnt/shared:/mnt/shared" in cfg["docker"]["run_options"]
    assert any("/mnt/shared" in c for c in cfg["initialization_commands"])
    # The project on every node.
    assert cfg["file_mounts"]["/home/ray/alexnet-pipeline"] == "."
    assert any("pip install" in c and "/home/ray/alexnet-pipeline" in c for c in cfg["setup_commands"])
    # Nothing but SSH from outside, and not from everywhere.
    for perm in cfg["provider"]["security_group"]["IpPermissions"]:
        assert (perm["FromPort"], perm["ToPort"]) == (22, 22)
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in perm["IpRanges"])
    # 8 GPUs per worker, none on the head.
    gpus = {"p3.16xlarge": 8, "p4d.24xlarge": 8, "p5.48xlarge": 8}
    types = cfg["available_node_types"]
    assert gpus[types["gpu_worker"]["node_config"]["InstanceType"]] == 8
    assert types[cfg["head_node_type"]]["resources"]["GPU"] == 0


def test_head_offers_no_cpus_or_gpus_for_work():
    """Nothing heavy on the head: every config starts its Ray with 0 CPUs and 0 GPUs there (the job
    driver needs neither), the workers with what their machines have."""
    from ray.scripts.scripts import cli

    start = cli.commands["start"]
    cfg = load(DEPLOY / "ray-cluster.yaml")
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}
    for key, head in (("head_start_ray_commands", True), ("worker_start_ray_commands", False)):
        (argv,) = [a for line in cfg[key] for a in ray_commands(line) if a[1] == "start"]
        params = start.make_context("start", argv[2:]).params
        want = 0 if head else None  # a worker offers its own cores and GPUs
        assert (params["num_cpus"], params["num_gpus"]) == (want, want), (key, argv)
    # KubeRay: rayStartParams become `ray start --KEY=VALUE` flags
    for f in ("raycluster.yaml", "rayjob.yaml"):
        doc = load(KUBERAY / f)["spec"]
        spec = doc.get("rayClusterSpec", doc)
        for group, head in [(spec["headGroupSpec"], True)] + [(g, False) for g in spec["workerGroupSpecs"]]:
            flags = [f"--{k}={v}" for k, v in group["rayStartParams"].items()]
            params = start.make_context("start", flags).params
            want = 0 if head else None
            assert (params["num_cpus"], params["num_gpus"]) == (want, want), (f, group["rayStartParams"])


def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = load(DEPLOY / "runtime_env.yaml")
    assert set(env) <= set(RuntimeEnv.known_fields), set(env) - set(RuntimeEnv.known_fields)
    assert "working_dir" not in env  # given by `ray job submit --working-dir .`
    assert {".git", ".venv", "data", "runs"} <= set(env["excludes"])
    RuntimeEnv(**env)


def test_job_stop_leaves_time_for_the_final_checkpoint():
    """`ray job stop` SIGKILLs the driver after RAY_JOB_STOP_WAIT_TIME_S (Ray's default 3 s), which
    the job supervisor reads from its environment: the job's runtime env or the head's own."""
    from cluster.config import load_config

    need = load_config("paper", None, {}).checkpoint.stop_timeout_s
    job_env = yaml.safe_load(load(KUBERAY / "rayjob.yaml")["spec"]["runtimeEnvYAML"])
    for env in (load(DEPLOY / "runtime_env.yaml"), load(KUBERAY / "runtime_env.yaml"), job_env):
        assert float(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) > need
    # issue 24: a job submitted by hand to the RayCluster brings no runtime env of its own
    for f in ("raycluster.yaml", "rayjob.yaml"):
        spec = load(KUBERAY / f)["spec"]
        (head,) = containers(spec.get("rayClusterSpec", spec)["headGroupSpec"]["template"])
        env = {e["name"]: e["value"] for e in head.get("env", [])}
        assert float(env.get("RAY_JOB_STOP_WAIT_TIME_S", 3)) > need, f


def test_every_ray_job_submit_in_the_readme_keeps_the_final_checkpoint():
    """Each `ray job submit` of the README names a runtime env that gives `ray job stop` time for the
    final checkpoint (the KubeRay hand-submit example had none: Ray's 3 s)."""
    from cluster.config import load_config
    from tests.deploy.test_readme import sections, shell_commands

    need = load_config("paper", None, {}).checkpoint.stop_timeout_s
    submits = [a for a in shell_commands(sections()) if a[:3] == ["ray", "job", "submit"]]
    assert len(submits) >= 3, submits
    for argv in submits:
        assert "--runtime-env" in argv, argv
        env = load(ROOT / argv[argv.index("--runtime-env") + 1])
        assert float(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) > need, argv


# ---------------------------------------------------------------------------- KubeRay


def test_rayjob_runs_the_raycluster_spec():
    assert (
        load(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"] == load(KUBERAY / "raycluster.yaml")["spec"]
    )


def test_kuberay_cluster_ports_gpus_storage_and_auth():
    import ray

    spec = load(KUBERAY / "raycluster.yaml")["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # never a LoadBalancer / NodePort
    (hc,) = containers(head["template"])
    ports = {p["name"]: p["containerPort"] for p in hc["ports"]}
    assert ports["alexnet-metrics"] == paper_metrics()["port"]
    assert paper_metrics()["addr"] == "0.0.0.0"  # scraped at the pod IP
    assert ports["metrics"] == int(head["rayStartParams"]["metrics-export-port"]) == 8080
    assert "nvidia.com/gpu" not in json.dumps(hc["resources"])
    pvc = load(KUBERAY / "storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    for group in spec["workerGroupSpecs"]:
        (wc,) = containers(group["template"])
        assert (
            wc["resources"]["limits"]["nvidia.com/gpu"]
            == wc["resources"]["requests"]["nvidia.com/gpu"]
            == "8"
        )
        assert {p["name"]: p["containerPort"] for p in wc["ports"]}["metrics"] == 8080
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
    for f in ("raycluster.yaml", "shards-job.yaml"):
        claims = set(walk(load(KUBERAY / f), "claimName"))
        assert claims == {pvc["metadata"]["name"]}, (f, claims)
        mounts = {m["mountPath"] for c in containers(load(KUBERAY / f)) for m in c["volumeMounts"]}
        assert "/mnt/shared" in mounts, (f, mounts)
    # The job reads its shards from and writes its checkpoints to the shared volume.
    argv = shlex.split(load(KUBERAY / "rayjob.yaml")["spec"]["entrypoint"])
    for flag in ("--data", "--run-dir"):
        assert argv[argv.index(flag) + 1].startswith("/mnt/shared/"), argv


def test_podmonitor_scrapes_ports_the_pods_have():
    pm = load(KUBERAY / "podmonitor.yaml")
    spec = load(KUBERAY / "raycluster.yaml")["spec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    selected = [
        t
        for t in templates
        if pm["spec"]["selector"]["matchLabels"].items() <= t["metadata"]["labels"].items()
    ]
    assert len(selected) == len(templates)
    port_names = {p["name"] for t in selected for c in containers(t) for p in c["ports"]}
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} == {"alexnet-metrics", "metrics"}
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= port_names


def test_prometheusrule_is_generated_from_alerts_yml():
    sys.path.insert(0, str(KUBERAY))
    try:
        import make_prometheusrule
    finally:
        sys.path.remove(str(KUBERAY))
    current = (KUBERAY / "prometheusrule.yaml").read_text()
    assert current == make_prometheusrule.render(), "run: python deploy/kuberay/make_prometheusrule.py"


# ---------------------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_coordinator_and_ray_service_discovery():
    import ray._private.ray_constants as rc

    cfg = load(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    (target,) = jobs["alexnet"]["static_configs"][0]["targets"]
    assert int(target.rsplit(":", 1)[1]) == paper_metrics()["port"]
    (sd,) = jobs["ray"]["file_sd_configs"][0]["files"]
    assert sd == f"/tmp/ray/{rc.PROMETHEUS_SERVICE_DISCOVERY_FILE}"
    for f in cfg["rule_files"]:
        assert (DEPLOY / "prometheus" / f).is_file(), f


# ---------------------------------------------------------------------------- PromQL names


def allowed_name(name: str) -> bool:
    return name in exported_names() or name.startswith("ray_")


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('max by (run) (alexnet_step{run=~"$run"})', {"alexnet_step"}),
        (
            'sum(rate(alexnet_images_total{run=~"$run"}[$__rate_interval])) or vector(0)',
            {"alexnet_images_total"},
        ),
        (
            'max by (run) (x_a{part="data_wait"}) / on (run) avg_over_time(y_b[5m] offset 30m) > 0.25',
            {"x_a", "y_b"},
        ),
        ('m{split="train"} != m{split="train"} or abs(m) == +Inf', {"m"}),
        ('changes(s[15m]) == 0 and on (run) st{st="running"} == 1', {"s", "st"}),
        ("sum by (State) (ray_actors) * 1e3", {"ray_actors"}),
    ],
)
def test_metric_name_extraction(expr, names):
    assert promql.metric_names(expr) == names


def test_dashboard_and_alerts_query_only_exported_metrics():
    exprs = promql.dashboard_exprs() + list(promql.alert_exprs().values())
    assert len(exprs) >= 20
    for e in exprs:
        names = promql.metric_names(e)
        assert names, f"no metric in {e!r}"
        bad = {n for n in names if not allowed_name(n)}
        assert not bad, f"{e!r} queries {bad}: not in cluster.metrics.exported_names() nor ray_*"


def test_dashboard_covers_the_required_views():
    used = set().union(*map(promql.metric_names, promql.dashboard_exprs()))
    required = {
        "alexnet_images_total",  # throughput
        "alexnet_loss",
        "alexnet_top1_error_ratio",
        "alexnet_top5_error_ratio",
        "alexnet_learning_rate",
        "alexnet_step_time_seconds",  # stacked breakdown
        "alexnet_pipeline_bubble_ratio",
        "alexnet_data_queue_depth_batches",
        "alexnet_decode_images_per_second",
        "alexnet_checkpoint_duration_seconds",
        "alexnet_restarts_total",
        "alexnet_total_steps",  # issue 24: the ETA
        "ray_node_gpus_utilization",  # issue 24: GPU utilisation and memory, from Ray's per-node metrics
        "ray_node_gram_used",
        "ray_node_gram_available",
    }
    assert required <= used, required - used


# ---------------------------------------------------------------------------- Grafana


def test_dashboard_is_importable_grafana_json():
    dash = json.loads(promql.DASHBOARD.read_text())
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["title"] and dash["uid"]
    assert "id" not in dash or dash["id"] is None  # an id would overwrite some other dashboard
    panels = promql.dashboard_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    run = variables["run"]
    assert run["type"] == "query" and run["includeAll"] and run["allValue"] == ".*"
    assert run["query"]["query"] == "label_values(alexnet_run_info, run)"
    assert "alexnet_run_info" in exported_names()
    for p in panels:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            # Every alexnet query is filtered to the chosen runs.
            if any(n.startswith("alexnet_") for n in promql.metric_names(t["expr"])):
                assert 'run=~"$run"' in t["expr"], t["expr"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    # Panels fit the 24-column grid without overlapping.
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for xy in ((x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])):
            assert xy not in cells, f"{p['title']} overlaps {cells[xy]}"
            cells[xy] = p["title"]
    # The stacked breakdown really stacks.
    (breakdown,) = [p for p in panels if p["title"] == "Step time breakdown"]
    assert breakdown["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
