"""``alexnet predict``: a checkpoint (or a run's newest) applied to image files, and its Python API.

Here and not in ``alexnet/`` because it reads checkpoints (:func:`cluster.evaluate.load_for_inference`,
the one loader); what it does to the images is :mod:`alexnet.infer`'s, pure::

    from cluster.predict import load_predictor

    p = load_predictor("runs/demo")            # a checkpoint dir, or a run dir (its newest)
    p.model                                   # FusedAlexNet in eval mode: float input -> logits
    p.preprocess                              # classes, input_size, stored_size, mean, input_scale
    rows = p.predict(["cat.jpg", "photos/"], top_k=5, crop="ten")
    feats, files = p.features(["photos/"], layer="fc7")     # (N, 4096) float32, row i = files[i]

    alexnet predict --checkpoint CKPT [--top-k K] [--ten-crop] [--batch-size B] [--device D]
                    [--resize R] [--json] [--features LAYER [--out PREFIX]] PATH...

A file's short side is scaled to the side the run's images were stored at (``stored_size`` of the
checkpoint; ``--resize`` to override), its center square cropped, then its center crop (or the
paper's 10 crops, softmax averaged) of the input size is fed to the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alexnet.config import CROP_FRACTION
from alexnet.infer import InferenceNet, image_files, load_image, run_batches
from cluster.evaluate import load_for_inference


@dataclass
class Predictor:
    """A checkpoint's network ready for files: ``model`` (the fused network, eval mode),
    ``preprocess`` (:class:`cluster.manifest.Preprocess`), and the side files are scaled to."""

    model: torch.nn.Module
    preprocess: Any  # cluster.manifest.Preprocess
    resize: int
    url: str
    step: int

    def net(self, layer: str = "fc8") -> InferenceNet:
        """The network with its normalisation, uint8 crops -> ``layer``'s outputs (what ``export`` saves)."""
        pre = self.preprocess
        return InferenceNet(self.model, pre.mean, pre.input_scale, layer).eval()

    def images(self, files: list[Path]) -> list[torch.Tensor]:
        """Each file as uint8 (3, resize, resize) (:func:`alexnet.infer.load_image`)."""
        return [load_image(f, self.resize) for f in files]

    def outputs(
        self, paths: list[str | Path], layer: str = "fc8", crop: str = "center", batch_size: int = 64
    ) -> tuple[np.ndarray, list[Path]]:
        """(N, n) float32 outputs of ``layer`` for the image files ``paths`` name (folders expanded)
        and those files, in row order; for fc8, log probabilities (10-crop: log mean softmax)."""
        files = image_files(paths)
        if batch_size < 1:
            raise ValueError(f"--batch-size {batch_size}: use >= 1")
        net = self.net(layer)
        size = self.preprocess.input_size
        out = []
        for i in range(0, len(files), batch_size):  # a batch of files in memory at a time
            images = self.images(files[i : i + batch_size])
            out += [b.numpy() for b in run_batches(net, images, size, crop, batch_size)]
        return np.concatenate(out), files

    def predict(
        self, paths: list[str | Path], top_k: int = 5, crop: str = "center", batch_size: int = 64
    ) -> list[dict[str, Any]]:
        """One row per file: ``{"path": ..., "top": [{"class": NAME, "index": I, "prob": P}, ...]}``,
        the ``top_k`` most probable classes, most probable first."""
        classes = self.preprocess.classes
        if not 1 <= top_k <= len(classes):
            raise ValueError(f"--top-k {top_k}: use 1..{len(classes)} (the checkpoint's classes)")
        logp, files = self.outputs(paths, "fc8", crop, batch_size)
        probs = torch.from_numpy(logp).exp()
        p, idx = probs.topk(top_k, dim=1)
        return [
            {
                "path": str(f),
                "top": [
                    {"class": classes[i], "index": i, "prob": float(q)}
                    for q, i in zip(p[r].tolist(), idx[r].tolist(), strict=True)
                ],
            }
            for r, f in enumerate(files)
        ]

    def features(
        self, paths: list[str | Path], layer: str = "fc7", crop: str = "center", batch_size: int = 64
    ) -> tuple[np.ndarray, list[Path]]:
        """(N, D) float32 ``layer`` outputs (after its ReLU; fc7: the paper's Figure 4 features; the
        mean over the 10 crops with ``crop="ten"``) and the files, in row order."""
        return self.outputs(paths, layer, crop, batch_size)


def load_predictor(checkpoint: str, device: str | torch.device | None = None, resize: int = 0) -> Predictor:
    """The :class:`Predictor` of ``checkpoint`` (a checkpoint dir, or a run dir: its newest that
    verifies) on ``device`` (default: the local GPU if any). ``resize`` > 0 overrides the side a
    file's short side is scaled to (default: the checkpoint's stored side; for a checkpoint that
    does not record it, the paper's ratio: input size / (227/256))."""
    dev = torch.device(device) if device not in (None, "auto") else None
    loaded = load_for_inference(checkpoint, dev)
    pre = loaded.preprocess
    side = resize or pre.stored_size or round(pre.input_size / CROP_FRACTION)
    if side < pre.input_size:
        raise ValueError(
            f"--resize {side}: smaller than the checkpoint's input size {pre.input_size}: use >= "
            f"{pre.input_size} (or leave it out: {pre.stored_size or 'the paper ratio'})"
        )
    return Predictor(loaded.model, pre, side, loaded.url, loaded.step)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :meth:`Predictor.predict` as a table: the path, then ``name prob`` per class."""
    width = max(len(r["path"]) for r in rows)
    lines = []
    for r in rows:
        tops = "  ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"])
        lines.append(f"{r['path']:<{width}}  {tops}")
    return "\n".join(lines)


def write_features(out: str, feats: np.ndarray, files: list[Path]) -> tuple[str, str]:
    """``OUT.npy`` (the (N, D) float32 features) and ``OUT.txt`` (the files, one per line, in row
    order); returns both paths."""
    npy, txt = f"{out}.npy", f"{out}.txt"
    Path(npy).parent.mkdir(parents=True, exist_ok=True)
    np.save(npy, feats.astype(np.float32))
    Path(txt).write_text("".join(f"{f}\n" for f in files))
    return npy, txt
