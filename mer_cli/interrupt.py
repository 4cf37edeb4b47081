"""Blocking waits in the main thread that still let Ctrl-C through.

CPython runs signal handlers only in the main thread, and a SIGINT that the
kernel delivers to one of our worker threads does not wake a main thread blocked
on a lock or queue: Ctrl-C would then go unanswered until the wait ends (seen:
``mer profile-ssd`` ignoring SIGINT for the rest of a run). So the main thread
waits in short slices and runs pending handlers between them.
"""

from __future__ import annotations

import concurrent.futures
import queue
from typing import Any

TICK = 0.1  # seconds between checks for a pending signal


def result(fut: concurrent.futures.Future) -> Any:
    """``fut.result()``, interruptible by Ctrl-C."""
    while True:
        try:
            return fut.result(timeout=TICK)
        except concurrent.futures.TimeoutError:
            continue


def get(q: queue.Queue) -> Any:
    """``q.get()``, interruptible by Ctrl-C."""
    while True:
        try:
            return q.get(timeout=TICK)
        except queue.Empty:
            continue
