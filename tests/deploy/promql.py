"""What the deploy tests need to know about the PromQL in deploy/: the expressions and their metric names.

Prometheus 2.42 (Debian's package, what CI installs) has no parse endpoint, and no Python PromQL
parser is kept up to date, so metric names are found by removing everything that cannot be one
(strings, label matchers, ranges, grouping clauses, offsets, numbers) and then dropping function
and aggregation names (identifiers followed by ``(``) and keywords. The tests of this module pin
it on expressions whose names are known.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "alexnet.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-z]+")
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (e.g. ``{"alexnet_loss"}``)."""
    s = _STRING.sub('""', expr)
    s = _BRACES.sub(" ", s)
    s = _RANGE.sub(" ", s)
    s = _GROUPING.sub(" ", s)
    s = _OFFSET.sub(" ", s)
    s = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", " ", s, flags=re.IGNORECASE)
    names = set()
    for name, call in _IDENT.findall(s):
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def dashboard_panels(dash: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    out = []
    for p in dash.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_targets(path: Path = DASHBOARD) -> list[dict]:
    """Every query target (``expr``, ``legendFormat``, ...) of the dashboard's panels, in panel order."""
    dash = json.loads(path.read_text())
    return [t for p in dashboard_panels(dash) for t in p.get("targets", []) if t.get("expr")]


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    """Every PromQL expression of the dashboard's panels, in panel order."""
    return [t["expr"] for t in dashboard_targets(path)]


def legend_labels(target: dict) -> set[str]:
    """The label names a target's legend shows (``{{run}} {{split}}`` -> ``{"run", "split"}``)."""
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))


def alert_exprs(path: Path = ALERTS) -> dict[str, str]:
    """Alert name -> expression of every rule in the rule file."""
    doc = yaml.safe_load(path.read_text())
    return {r.get("alert") or r["record"]: r["expr"] for g in doc["groups"] for r in g["rules"]}


def grafana_to_promql(expr: str, run: str = ".*", rate_interval: str = "30s") -> str:
    """The expression as Grafana sends it: the dashboard's variables substituted."""
    return expr.replace("$__rate_interval", rate_interval).replace("$run", run)
