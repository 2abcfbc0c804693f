"""Async callers of the synchronous engine: its work runs on a thread, so the event loop keeps running.

Framework adapters use these for their async entry points (LlamaIndex ``acomplete``/``astream_*``,
LangChain ``_agenerate``/``_astream``); the pipeline is safe to share between threads, so two awaited
calls overlap instead of running one after the other.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
_END = object()
AHEAD = 4  # items a worker may hand over before the consumer takes them: a slow or gone reader stops decoding
_POLL_S = 0.05  # how often a worker waiting for room looks whether its reader is gone


async def run_in_thread(work: Callable[[], T]) -> T:
    """``work()`` on a worker thread (with the caller's context variables), awaited."""
    return await asyncio.to_thread(work)


class Steps(Protocol):
    def steps(self) -> Iterable[Any]:
        """Pieces of work done one by one, the last item the result (a PipelineStream's text deltas, then its
        answer)."""


async def finish_in_thread(start: Callable[[], Steps]) -> Any:
    """The last of ``start().steps()``, the stream created and run on a worker thread step by step: a cancelled
    await (``asyncio.wait_for``, a client gone) stops it at its next step, where :func:`run_in_thread` would decode to
    the end."""
    last = None
    async for last in iterate_in_thread(lambda: start().steps()):  # noqa: B007 (the loop keeps the last item)
        pass
    return last


async def iterate_in_thread(make: Callable[[], Iterable[T]]) -> AsyncIterator[T]:
    """The items of ``make()``, created and iterated on a worker thread and handed over through a queue.

    An exception in the thread is raised here; leaving the ``async for`` early stops the thread at its
    next item, and a reader that stops reading stops it within :data:`AHEAD` items.

    The thread is not a daemon: at interpreter exit Python waits for it to finish its step, as killing it inside a
    torch forward aborts the process ("terminate called without an active exception"). It ends once its reader is
    gone (the loop closed, or the main thread done: an async generator never closed leaves no other sign).
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    room = threading.Semaphore(AHEAD)

    def reader_gone() -> bool:
        return stop.is_set() or loop.is_closed() or not threading.main_thread().is_alive()

    def wait_for_room() -> bool:
        while not room.acquire(timeout=_POLL_S):
            if reader_gone():
                return False
        return not stop.is_set()

    def hand(message: tuple) -> bool:
        try:
            loop.call_soon_threadsafe(items.put_nowait, message)
            return True
        except RuntimeError:  # the loop is closed (asyncio.run returned): nobody reads any more
            return False

    def produce() -> None:
        try:
            for item in make():
                if not wait_for_room() or not hand((item, None)):
                    return  # the rest of make() is never asked for: the engine stops decoding
        except BaseException as err:  # handed to the consumer, which raises it
            hand((_END, err))
        else:
            hand((_END, None))

    threading.Thread(target=produce, name="infoflow-async").start()
    try:
        while True:
            item, error = await items.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            room.release()
            yield item
    finally:
        stop.set()
        room.release()  # a worker waiting for room sees the stop at once
