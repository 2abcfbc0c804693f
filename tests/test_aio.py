"""The engine's work on a worker thread for async callers: an abandoned stream ends quietly."""

import asyncio
import contextlib
import subprocess
import sys
import threading
import time

from infoflow_rag.aio import AHEAD, finish_in_thread, iterate_in_thread


def test_a_stream_left_open_ends_quietly_when_its_event_loop_closes(monkeypatch):
    errors, produced = [], []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))

    def slow():
        for i in range(50):
            produced.append(i)
            time.sleep(0.01)
            yield i

    async def first_item() -> int:
        stream = iterate_in_thread(slow)
        return await anext(stream)  # then left open: asyncio.run closes it, then its loop

    assert asyncio.run(first_item()) == 0
    time.sleep(0.2)  # the producer's next hand-off would meet the closed loop
    assert errors == [] and len(produced) < 50  # no "Event loop is closed" from the thread, and it stopped


class CountedSteps:
    """A stream of 100 slow steps whose last is its result; counts the steps taken."""

    def __init__(self) -> None:
        self.taken = 0

    def steps(self):
        for i in range(100):
            self.taken += 1
            time.sleep(0.005)
            yield i


def test_finish_in_thread_returns_the_last_step_and_a_cancelled_await_stops_the_steps():
    assert asyncio.run(finish_in_thread(CountedSteps)) == 99
    stream = CountedSteps()

    async def cancelled() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finish_in_thread(lambda: stream), timeout=0.05)
        taken = stream.taken
        await asyncio.sleep(0.2)  # time for 40 more steps, had it gone on
        assert stream.taken - taken <= 1  # at most the step under way when the await was cancelled

    asyncio.run(cancelled())
    assert stream.taken < 100


def test_a_reader_that_stops_reading_stops_the_producer_within_a_few_items():
    produced = []

    def fast():
        for i in range(1000):
            produced.append(i)
            time.sleep(0.001)
            yield i

    async def read_one_then_wait() -> int:
        stream = iterate_in_thread(fast)
        await anext(stream)
        await asyncio.sleep(0.3)  # time for ~300 items, had the producer run ahead unbounded
        ahead = len(produced)
        await stream.aclose()
        return ahead

    assert asyncio.run(read_one_then_wait()) <= 1 + AHEAD + 1  # the one read, AHEAD handed over, one waiting


# The worker is inside one torch product when the script ends: a daemon thread resumed after the interpreter has
# finalised aborts the process ("terminate called without an active exception", exit status 134).
_EXIT_DURING_A_FORWARD = """
import asyncio, torch
from infoflow_rag.aio import iterate_in_thread

def steps():
    yield 0
    a = torch.ones(4000, 4000)
    for _ in range(3):
        yield float((a @ a)[0, 0])

async def main():
    stream = iterate_in_thread(steps)
    await anext(stream)
    await asyncio.sleep(0.05)  # the worker is in its first product

asyncio.run(main())
"""


def test_a_script_that_ends_while_the_worker_runs_torch_exits_cleanly():
    done = subprocess.run([sys.executable, "-c", _EXIT_DURING_A_FORWARD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
