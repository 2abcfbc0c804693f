"""The engine's work on a worker thread for async callers: an abandoned stream ends quietly."""

import asyncio
import threading
import time

from infoflow_rag.aio import iterate_in_thread


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
