"""Main-thread waits in slices: they return what the plain calls return and let
a signal handler's exception (Ctrl-C) out while nothing arrives."""

import concurrent.futures
import queue
import signal
import threading
import time

import pytest

from mer_cli import interrupt


def test_result_and_get_return_values_and_errors():
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(lambda: (time.sleep(0.25), 42)[1])
        assert interrupt.result(slow) == 42  # longer than one slice
        bad = pool.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            interrupt.result(bad)
    q = queue.Queue()
    threading.Timer(0.25, q.put, args=("item",)).start()
    assert interrupt.get(q) == "item"


def test_signal_interrupts_a_wait_that_never_ends():
    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, handler)
    # an idle thread the kernel may hand the signal to instead of the main thread
    idle = threading.Event()
    threading.Thread(target=idle.wait, daemon=True).start()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            interrupt.get(queue.Queue())  # nothing ever arrives
        assert time.monotonic() - t0 < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        idle.set()
