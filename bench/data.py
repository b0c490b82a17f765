"""Data pipeline benchmark: decode + augment + collate images/s per core, vs the pipeline a user would write.

Ours: ``alexnet.data.reader.Stream`` (what each Ray data worker runs): torchvision ``decode_jpeg``,
crop/flip as tensor views copied straight into a preallocated uint8 batch, lighting offsets.
Baseline: the same shards through ``torch.utils.data.DataLoader`` over ``webdataset.WebDataset`` with
PIL decode + ``RandomCrop`` + ``RandomHorizontalFlip`` + ``ToTensor``. Both in this process on one
thread (``num_workers=0``, ``torch.set_num_threads(1)``): images/s per core. Rounds are interleaved and
the median taken, since the machine is shared. Also times ``alexnet shards`` on a generated
ImageFolder of ImageNet-sized JPEGs (500x375).

The encoded path (``data.decode = "device"``), in the same run: bytes per image through the object
store, encoded (JPEG bytes + augmentation parameters) vs decoded (the uint8 crop: goal <= 0.3x);
the worker side's images/s per core when it only reads records and draws the parameters vs when it
decodes (the rate above); and the trainer side's decode + crop rate on this CPU
(:func:`alexnet.data.encoded.decode_rows`; nvJPEG on a GPU: ``bench/gpu_check.py``).

    .venv/bin/python bench/data.py [--images 400] [--batches 8] [--rounds 3]

Last line: JSON with images_per_s_per_core, baseline_images_per_s_per_core, ratio, shards_images_per_s,
object_store_bytes_per_image, decoded_bytes_per_image, encoded_vs_decoded_bytes,
draw_images_per_s_per_core, draw_vs_decode, trainer_decode_images_per_s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as T

from alexnet.data.batch import Batch
from alexnet.data.index import DatasetIndex
from alexnet.data.reader import ReaderSpec, Stream
from alexnet.data.writer import build_shards


def make_imagefolder(root: Path, n: int, classes: int = 4) -> None:
    """ImageNet-like JPEGs: smooth colour fields plus texture, 500x375 (JPEG ~30-60 KB)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        low = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize(
            (500, 375), Image.BICUBIC
        )
        img = np.asarray(low, np.float32) + rng.normal(0, 10, (375, 500, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i}.jpg", quality=90)
    (root / "val" / "c0").mkdir(parents=True)
    Image.open(root / "train/c0/0.jpg").save(root / "val/c0/0.jpg")


def ours(url: str, batch: int, batches: int, seed: int, encoded: bool = False) -> tuple[float, Batch]:
    """Images/s of one stream (decoding, or with ``encoded`` only drawing), and its last batch."""
    spec = ReaderSpec(url, batch_size=batch, input_size=227, seed=seed, shuffle_buffer=100, encoded=encoded)
    stream = Stream(spec, 0)
    b = stream.next_batch()  # warm-up (file open, first decode)
    t0 = time.perf_counter()
    for _ in range(batches):
        b = stream.next_batch()
    return batches * batch / (time.perf_counter() - t0), b


def trainer_decode(batch: Batch, reps: int) -> float:
    """Images/s of the trainer side's decode + crop of a whole encoded batch on this CPU."""
    cpu = torch.device("cpu")
    batch.pixels(227, cpu, torch.from_numpy)  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        batch.pixels(227, cpu, torch.from_numpy)
    return reps * len(batch) / (time.perf_counter() - t0)


def baseline(urls: list[str], batch: int, batches: int) -> float:
    tf = T.Compose([T.RandomCrop(227), T.RandomHorizontalFlip(), T.ToTensor()])
    ds = (
        wds.WebDataset(urls, shardshuffle=False)
        .shuffle(100)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(tf, lambda c: int(c))
    )
    it = iter(torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=0))
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400, help="generated source images")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8, help="timed batches per round (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shard-workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_imagefolder(root / "src", args.images)
        t0 = time.perf_counter()
        s = build_shards(
            str(root / "src"),
            str(root / "shards"),
            shard_size=100,
            workers=args.shard_workers,
            progress=False,
        )
        shards_ips = sum(s.counts.values()) / (time.perf_counter() - t0)
        url = str(root / "shards")
        urls = [sh.url for sh in DatasetIndex.load(url).shards("train")]
        if (args.batches + 1) * args.batch > sum(s.counts.values()):
            raise ValueError("--images too small for --batches x --batch (one pass, no wrap-around)")
        mine, base, draw, dec = [], [], [], []
        for r in range(args.rounds):
            ips, decoded = ours(url, args.batch, args.batches, seed=r)
            mine.append(ips)
            base.append(baseline(urls, args.batch, args.batches))
            ips, encoded = ours(url, args.batch, args.batches, seed=r, encoded=True)
            draw.append(ips)
            dec.append(trainer_decode(encoded, max(1, args.batches // 2)))
            print(
                f"round {r}: ours {mine[-1]:.0f} img/s, baseline {base[-1]:.0f} img/s, worker read+draw "
                f"{draw[-1]:.0f} img/s, trainer decode+crop {dec[-1]:.0f} img/s",
                flush=True,
            )
    m, b = statistics.median(mine), statistics.median(base)
    n = args.batch
    enc_b, dec_b = encoded.nbytes / n, decoded.nbytes / n
    print(
        f"alexnet shards: {shards_ips:.0f} images/s with {args.shard_workers} processes (500x375 JPEG -> 256)"
    )
    result = {
        "images_per_s_per_core": round(m, 1),
        "baseline_images_per_s_per_core": round(b, 1),
        "ratio": round(m / b, 3),
        "shards_images_per_s": round(shards_ips, 1),
        "object_store_bytes_per_image": round(enc_b),
        "decoded_bytes_per_image": round(dec_b),
        "encoded_vs_decoded_bytes": round(enc_b / dec_b, 4),
        "draw_images_per_s_per_core": round(statistics.median(draw), 1),
        "draw_vs_decode": round(statistics.median(draw) / m, 3),
        "trainer_decode_images_per_s": round(statistics.median(dec), 1),
        "batch": args.batch,
        "input_size": 227,
        "stored_size": 256,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
