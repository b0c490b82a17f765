"""A bounded producer thread: what a data worker runs for its training streams and its val passes.

One thread makes items while :meth:`Producer.room` allows (backpressure: a bounded buffer that its
readers drain); readers wait on the same condition for what they need. An exception in the thread
is kept and raised to every reader (never a silent hang), and :meth:`Producer.stop` wakes them all.
The owner's buffer and its rules (what "room" means, when an item is released) stay with the owner;
they are read and changed under :attr:`Producer.cond`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class ProducerFailed(RuntimeError):
    """The producer thread raised; ``__cause__`` is its exception."""


class Producer:
    """``make()`` runs in a daemon thread each time ``room()`` (called under :attr:`cond`) is true;
    it returns False when there is nothing more to make. ``make`` publishes its item under
    :attr:`cond` and calls :meth:`changed`."""

    def __init__(self, name: str, make: Callable[[], bool], room: Callable[[], bool]) -> None:
        self.name, self._make, self._room = name, make, room
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)

    def start(self) -> Producer:
        """Start the thread; returns self."""
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.stopped or self._room())
                    if self.stopped:
                        return
                if not self._make():
                    return
        except BaseException as e:  # raised to the readers by wait()
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def changed(self) -> None:
        """Wake the thread and the readers (call under :attr:`cond`)."""
        self.cond.notify_all()

    def wait(self, ready: Callable[[], bool], timeout_s: float | None) -> bool:
        """Wait (under :attr:`cond`, which the caller holds) until ``ready()``, the thread failed
        (:class:`ProducerFailed`) or it was stopped; False on timeout."""
        ok = self.cond.wait_for(lambda: ready() or self.error is not None or self.stopped, timeout=timeout_s)
        if self.error is not None:
            raise ProducerFailed(f"{self.name} failed: {self.error!r}") from self.error
        return ok

    def stop(self) -> None:
        """Stop making items and wake every reader."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
