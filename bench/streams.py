"""What reading an epoch as many streams costs on a small dataset, against reading it as one.

``data.streams`` cuts the epoch's rotated sample sequence into contiguous runs, one per stream
(:func:`alexnet.data.reader.epoch_segments`). On a small set a run is shorter than a shard, so most
runs start inside a shard and its reader has to get there: a tar has no index, so the records
before the run's start are read past, headers only. This times one epoch through
:func:`alexnet.data.reader.epoch_batches` (decode, augment, collate: what the data workers run) with
``--streams`` streams against one stream over the same shards, on one thread, median of
interleaved rounds; for one shard holding the whole train split (the demo's generated set) and for
shards of ``--small-shard`` samples.

    .venv/bin/python bench/streams.py [--images 640] [--streams 16] [--rounds 3]

Last line: JSON with ms per batch for each case and ``ratio`` (many streams over one) per layout.
To compare two versions, run it in a checkout of each, one after the other (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, before bench/ itself


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=640, help="generated 40 px images (90 %% train)")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--small-shard", type=int, default=36, help="samples per shard of the second layout")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import torch
    import torchvision  # noqa: F401 - its import (~2 s) is the first decode's, not the timed epochs'

    from alexnet.data.reader import ReaderSpec, epoch_batches
    from alexnet.data.writer import build_synthetic

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="streams"))
    out: dict[str, float] = {}
    for layout, shard_size in (("one_shard", 1_000_000), (f"shards_of_{args.small_shard}", args.small_shard)):
        url = str(root / layout)
        build_synthetic(args.images, url, shard_size=shard_size, workers=1, progress=False)
        times: dict[int, list[float]] = {1: [], args.streams: []}
        for r in range(args.rounds):
            for streams in (1, args.streams) if r % 2 == 0 else (args.streams, 1):
                spec = ReaderSpec(url, batch_size=32, input_size=32, workers=1, streams=streams)
                t0 = time.perf_counter()
                n = sum(1 for _ in epoch_batches(spec, r))
                times[streams].append((time.perf_counter() - t0) / n)
        one, many = (statistics.median(times[s]) for s in (1, args.streams))
        out[f"{layout}_ms_per_batch_1_stream"] = round(1000 * one, 1)
        out[f"{layout}_ms_per_batch_{args.streams}_streams"] = round(1000 * many, 1)
        out[f"{layout}_ratio"] = round(many / one, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
