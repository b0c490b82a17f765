"""The trainer's feed (no Ray: a fake data client): steps fetched ahead in order, the next step asked
for only once the current one's data is held, a jump restarts it, rows and tensors as the engine
wants them, device-decoded batches with a bad JPEG fed as the mean and counted."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.data.batch import Batch
from alexnet.data.codec import JpegCodec
from alexnet.data.encoded import draw_encoded
from alexnet.data.records import ReaderStats
from cluster.feed import Feed, FeedSpec

B, S = 4, 8
CPU = torch.device("cpu")


def _plain(step: int) -> Batch:
    rng = np.random.default_rng(step)
    images = rng.integers(0, 255, (B, 3, S, S), dtype=np.uint8)
    images.flags.writeable = False  # as the object store hands them out
    labels = np.arange(B, dtype=np.int64) + 10 * step
    keys = [f"s{step}-{i}" for i in range(B)]
    return Batch(labels, keys, np.zeros((B, 3), np.float32), images=images, index=step)


class FakeClient:
    """Records the order of requests and resolves; ``resolve`` of step t checks that no later step
    was requested before it (the worker would have released t)."""

    def __init__(self, make=_plain) -> None:
        self.make, self.log, self.lock = make, [], threading.Lock()

    def request(self, step: int, consumer: int = 0, images: bool = True):
        with self.lock:
            self.log.append(("request", step, consumer))
        return step

    def resolve(self, ref, step: int, consumer: int = 0, images: bool = True) -> Batch:
        with self.lock:
            requested = [s for kind, s, c in self.log if kind == "request" and c == consumer]
            assert max(requested) == step, f"step {max(requested)} asked for before {step} was held"
            self.log.append(("resolve", step, consumer))
        batch = self.make(step)
        if not images:
            return batch.labels_only()
        return batch


def _spec(**kw) -> FeedSpec:
    base = dict(consumer=0, part=0, parts=1, images=True, labels=True, input_size=S, scale=1.0)
    base.update(kw)
    return FeedSpec(**base)


def _wait_for(pred, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_steps_come_ahead_and_in_order():
    client = FakeClient()
    mean = torch.full((3, S, S), 100.0)
    feed = Feed(client, _spec(), CPU, mean, end=10, depth=2)
    try:
        fed = feed.get(0)
        want = torch.from_numpy(_plain(0).images).float() - 100.0
        assert torch.equal(fed.images, want) and fed.labels.tolist() == [0, 1, 2, 3]
        assert fed.corrupt_keys == ()
        # the thread works ahead: steps 1 and 2 are ready (depth 2), 3 fetched and waiting for room
        _wait_for(lambda: ("resolve", 3, 0) in client.log)
        assert ("request", 4, 0) not in client.log
        assert [feed.get(t).step for t in (1, 2, 3)] == [1, 2, 3]
    finally:
        feed.close()
    asked = [s for kind, s, _ in client.log if kind == "request"]
    assert asked == sorted(asked)


def test_a_jump_restarts_the_feed_and_the_end_is_respected():
    client = FakeClient()
    feed = Feed(client, _spec(), CPU, torch.zeros(3, S, S), end=8, depth=1)
    try:
        assert feed.get(0).step == 0
        assert feed.get(6).step == 6  # a recovery: the thread starts again at 6
        assert feed.get(7).step == 7
        time.sleep(0.2)
        assert max(s for kind, s, _ in client.log if kind == "request") == 7  # nothing past the end
    finally:
        feed.close()


def test_rows_of_a_replica_and_a_label_only_rank():
    client = FakeClient()
    feed = Feed(client, _spec(part=1, parts=2), CPU, torch.zeros(3, S, S), end=3)
    labels_only = Feed(client, _spec(consumer=1, part=1, parts=2, images=False), CPU, None, end=3)
    try:
        fed = feed.get(0)
        assert fed.images.shape == (2, 3, S, S) and fed.keys == ["s0-2", "s0-3"]
        assert torch.equal(fed.images, torch.from_numpy(_plain(0).images[2:]).float())
        lab = labels_only.get(0)
        assert lab.images is None and lab.labels.tolist() == [2, 3] and lab.keys == ["s0-2", "s0-3"]
    finally:
        feed.close()
        labels_only.close()


def _jpeg(seed: int, side: int = 12) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_a_jpeg_that_does_not_decode_is_fed_as_the_mean_and_counted():
    light = np.eye(3, dtype=np.float32)
    samples = []
    for i in range(B):
        data = _jpeg(i)
        rec = {"__key__": f"k{i}", "jpg": data, "cls": b"1", "__url__": "u"}
        samples.append(draw_encoded(rec, 0, 0, 12, S, light, ReaderStats()))
    broken = bytearray(samples[2].data)
    broken[len(broken) // 2 :] = b"\x00" * (len(broken) - len(broken) // 2)  # the scan zeroed
    samples[2] = samples[2]._replace(data=bytes(broken))
    batch = JpegCodec(0, 12, S, light).collate(samples)
    feed = Feed(FakeClient(lambda step: batch), _spec(), CPU, torch.full((3, S, S), 50.0), end=1)
    try:
        fed = feed.get(0)
    finally:
        feed.close()
    assert fed.corrupt_keys == ("k2",)
    assert torch.equal(fed.images[2], torch.zeros(3, S, S))  # the mean image: zero input
    assert all(fed.images[i].abs().sum() > 0 for i in (0, 1, 3))


def test_an_error_in_the_thread_reaches_the_step():
    def boom(step: int) -> dict:
        raise TimeoutError(f"data batch for step {step} not received")

    feed = Feed(FakeClient(boom), _spec(), CPU, torch.zeros(3, S, S), end=3)
    try:
        with pytest.raises(TimeoutError, match="step 0"):
            feed.get(0)
    finally:
        feed.close()
