"""``alexnet export``: a checkpoint's network as a ``torch.export`` program (and ONNX, optional),
checked against ``alexnet predict`` on real images before the command succeeds.

    alexnet export --checkpoint CKPT OUT --images PATH... [--onnx] [--tolerance T]

``OUT/`` gets:

* ``model.pt2``: ``torch.export.save`` of :class:`alexnet.infer.InferenceNet`, uint8 (B, 3, S, S)
  crops -> (B, n) float32 logits, the mean and ``input_scale`` inside, any batch size
  (``torch.export.load(OUT/model.pt2).module()(crops)``);
* ``model.onnx``: the same graph through ``torch.onnx.export(dynamo=True)``, with ``--onnx`` (the
  ``onnx`` extra: ``pip install 'alexnet-pipeline[onnx]'``);
* ``preprocess.json``: what stays outside the program: the short side scaled to ``resize`` px
  (Pillow, bilinear, antialiased), the center square, then the center ``input_size`` crop, RGB,
  channels first, uint8; a softmax over the logits; the class names.

The check (:func:`verify`): every program's softmax on the center crops of the ``--images`` files
against :meth:`cluster.predict.Predictor.predict`'s, the largest difference of any class
probability at most ``--tolerance`` (default 1e-4: float32 with another kernel order, orders of
magnitude under the differences that change a ranking), and the same top-1 class for every image.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alexnet.infer import crops, image_files
from cluster.predict import Predictor

TOLERANCE = 1e-4  # max |p_export - p_predict| over every class of every image
MAX_BATCH = 4096  # the exported batch dimension's upper bound


class ExportMismatch(ValueError):
    """An exported program's outputs differ from predict's by more than the tolerance."""


@dataclass
class Check:
    """One program's check against predict: the largest probability difference, top-1 agreement."""

    file: str
    images: int
    max_abs_prob_diff: float
    top1_agree: int


def _example(p: Predictor, batch: int = 2) -> torch.Tensor:
    s = p.preprocess.input_size
    return torch.zeros(batch, 3, s, s, dtype=torch.uint8, device=p.preprocess.mean.device)


def export_program(p: Predictor, out: Path) -> Path:
    """``OUT/model.pt2``: ``torch.export`` of ``p``'s uint8-crops -> logits network, batch dynamic."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # weights that need no gradient: the program's in-place LRN kernels (out= ops) then run without
    # torch.no_grad() around the call, as a user of the loaded program calls it
    net = p.net("fc8").requires_grad_(False)
    ep = torch.export.export(net, (_example(p),), dynamic_shapes=({0: batch},))
    path = out / "model.pt2"
    torch.export.save(ep, str(path))
    return path


def onnx_available() -> str | None:
    """None when the ONNX exporter and runtime import, else why not (the install line)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        return (
            f"{e.name} is not installed: pip install 'alexnet-pipeline[onnx]' (onnx, onnxscript, onnxruntime)"
        )
    return None


def export_onnx(p: Predictor, out: Path) -> Path:
    """``OUT/model.onnx`` through torch's dynamo exporter (needs the ``onnx`` extra)."""
    why = onnx_available()
    if why:
        raise ValueError(f"--onnx: {why}")
    path = out / "model.onnx"
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # device-neutral file; onnxruntime checks it on CPU
    net = copy.deepcopy(p.net("fc8")).requires_grad_(False).cpu()  # a copy: p's model stays where it is
    example = _example(p).cpu()
    prog = torch.onnx.export(net, (example,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    prog.save(str(path))
    return path


def preprocess_record(p: Predictor) -> dict:
    """``preprocess.json``: what a user of the program does before and after it."""
    pre = p.preprocess
    return {
        "input": {"dtype": "uint8", "layout": "NCHW", "channels": "RGB", "size": pre.input_size},
        "resize": p.resize,
        "steps": [
            f"scale the short side to {p.resize} px (bilinear, antialiased; Pillow's Image.resize)",
            f"take the center {p.resize}x{p.resize} square",
            f"take the center {pre.input_size}x{pre.input_size} crop (or the paper's 10 crops and average "
            "the softmax)",
        ],
        "inside_the_program": f"(pixels - mean) * {pre.input_scale} (the mean: {pre.mean_kind}, a buffer)",
        "output": "logits (B, classes); softmax gives the probabilities",
        "classes": list(pre.classes),
        "checkpoint": p.url,
        "step": p.step,
    }


def _probs_pt2(path: Path, x: torch.Tensor) -> np.ndarray:
    prog = torch.export.load(str(path)).module()
    with torch.no_grad():
        return torch.softmax(prog(x).float(), dim=1).cpu().numpy()


def _probs_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime

    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {sess.get_inputs()[0].name: x.cpu().numpy()})
    return torch.softmax(torch.from_numpy(logits).float(), dim=1).numpy()


def verify(p: Predictor, path: Path, images: list[str], tolerance: float = TOLERANCE) -> Check:
    """Check the program at ``path`` (``.pt2`` or ``.onnx``) against ``p.predict`` on ``images``'
    center crops; an :class:`ExportMismatch` when any probability differs by more than
    ``tolerance`` or a top-1 class differs."""
    files = image_files(images)
    size = p.preprocess.input_size
    x = torch.cat([crops(im, size, "center") for im in p.images(files)]).to(p.preprocess.mean.device)
    ref, _ = p.outputs(files, "fc8", "center")
    ref = np.exp(ref)  # predict's probabilities
    got = _probs_onnx(path, x) if path.suffix == ".onnx" else _probs_pt2(path, x)
    diff = float(np.abs(got - ref).max())
    agree = int((got.argmax(1) == ref.argmax(1)).sum())
    check = Check(path.name, len(files), diff, agree)
    if diff > tolerance or agree != len(files):
        raise ExportMismatch(
            f"{path}: outputs differ from alexnet predict's on {len(files)} images (largest probability "
            f"difference {diff:.3g}, tolerance {tolerance:g}; top-1 agrees on {agree}): do not use it; "
            "report this with the torch version"
        )
    return check


def export_checkpoint(
    p: Predictor, out: str, images: list[str], onnx: bool = False, tolerance: float = TOLERANCE
) -> list[Check]:
    """Write ``OUT/model.pt2`` (and ``model.onnx``), ``preprocess.json``; verify each program."""
    if not images:
        raise ValueError(
            "--images: give image files or folders to check the exported program against predict"
        )
    if onnx and (why := onnx_available()):  # before any file is written
        raise ValueError(f"--onnx: {why}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    (root / "preprocess.json").write_text(json.dumps(preprocess_record(p), indent=2) + "\n")
    paths = [export_program(p, root)] + ([export_onnx(p, root)] if onnx else [])
    return [verify(p, path, images, tolerance) for path in paths]
