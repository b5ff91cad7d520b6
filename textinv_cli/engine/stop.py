"""Ctrl-C during a training run: a flag the run engine reads after each optimizer step."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time


class StopFlag:
    """Ctrl-C asks to stop after the current optimizer step; presses while a checkpoint is
    being written are ignored. A third press outside checkpointing aborts at once.

    `debounce` (seconds) counts signals that arrive together as one press: under torchrun a
    terminal Ctrl-C reaches each worker twice, from the terminal and forwarded by the agent."""

    def __init__(self, debounce: float = 0.0):
        self.requested = False
        self.checkpointing = False
        self.presses = 0
        self.debounce = debounce
        self._last = -math.inf

    def __call__(self, signum, frame):
        self.requested = True
        now = time.monotonic()
        if self.checkpointing or now - self._last < self.debounce:
            return
        self._last = now
        self.presses += 1
        if self.presses >= 3:
            raise KeyboardInterrupt


@contextlib.contextmanager
def sigint_flag(debounce: float = 0.0):
    flag = StopFlag(debounce)
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signals only reach the main thread; the caller stops us another way
        return
    old = signal.signal(signal.SIGINT, flag)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)
