"""Per-layer shapes, parameters and multiply-accumulates of the network (the paper's two-column
net, or any variant its switches make)."""

from __future__ import annotations

import math

from alexnet.config import ModelConfig
from alexnet.model import block_names, geometry, model_blocks, net_columns


def layer_table(cfg: ModelConfig) -> list[dict]:
    """One row per layer (conv/fc, and the pools), both columns summed in ``params``/``macs``.

    ``output_shape`` lists the per-column output shape, column 0 first.
    """
    rows = []
    for spec in model_blocks(cfg):
        geos = [geometry(cfg, spec.name, c) for c in net_columns(cfg)]
        params = sum(math.prod(g.weight_shape) + g.weight_shape[0] for g in geos)
        # one MAC per weight element per output position
        macs = sum(math.prod(g.weight_shape) * math.prod(g.conv_out[1:]) for g in geos)
        rows.append(
            {
                "name": spec.name,
                "output_shape": [list(g.conv_out) for g in geos],
                "params": params,
                "macs": macs,
                "input": spec.input,
            }
        )
        if spec.pool:
            rows.append(
                {
                    "name": f"pool{spec.index + 1}",
                    "output_shape": [list(g.out) for g in geos],
                    "params": 0,
                    "macs": 0,
                    "input": "own",
                }
            )
    return rows


def block_macs(cfg: ModelConfig) -> dict[str, int]:
    """Forward multiply-accumulates of each block for one image, both columns (pools cost none)."""
    return {r["name"]: r["macs"] for r in layer_table(cfg) if r["name"] in block_names(cfg)}


def summary(cfg: ModelConfig) -> dict:
    """The JSON of ``alexnet info --json``."""
    layers = layer_table(cfg)
    return {
        "input_size": cfg.input_size,
        "num_classes": cfg.num_classes,
        "columns": cfg.columns,
        "params": sum(r["params"] for r in layers),
        "macs_per_image": sum(r["macs"] for r in layers),
        "exchange_points": [s.name for s in model_blocks(cfg) if s.exchange] if cfg.columns == 2 else [],
        "switches": switches(cfg),
        "layers": layers,
    }


def switches(cfg: ModelConfig) -> dict:
    """The paper's findings as ``cfg`` sets them (README "The paper's findings")."""
    return {
        "activation": cfg.activation,
        "pooling": cfg.pooling,
        "lrn": cfg.lrn,
        "columns": cfg.columns,
        "remove_blocks": list(cfg.remove_blocks),
        "dropout": cfg.dropout,
    }


def format_table(cfg: ModelConfig) -> str:
    """The human-readable table of ``alexnet info``."""
    s = summary(cfg)
    net = "Two-column AlexNet" if cfg.columns == 2 else "One-column AlexNet (the paper's section 3.2 net)"
    sw = ", ".join(f"{k}={v}" for k, v in s["switches"].items())
    lines = [
        f"{net}: {s['input_size']}x{s['input_size']} input, {s['num_classes']} classes; {sw}",
        f"{'layer':<7} {'input':<6} {'per-column output':<28} {'params':>12} {'MACs':>15}",
    ]
    for r in s["layers"]:
        shape = " | ".join("x".join(map(str, o)) for o in r["output_shape"])
        lines.append(f"{r['name']:<7} {r['input']:<6} {shape:<28} {r['params']:>12,} {r['macs']:>15,}")
    lines.append(f"{'total':<7} {'':<6} {'':<28} {s['params']:>12,} {s['macs_per_image']:>15,}")
    where = ", ".join(s["exchange_points"])
    exchange = f"exchange (both columns) before {where}" if where else "one column, no exchanges"
    lines.append(f"{s['macs_per_image'] / 1e9:.3f} GMAC per image forward; {exchange}")
    return "\n".join(lines)
