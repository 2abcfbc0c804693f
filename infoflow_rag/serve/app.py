"""The OpenAI-compatible HTTP API over one pipeline: chat and text completions, streamed or not.

Routes only translate: a request becomes prompt pieces (passages found by their text, sent apart or
retrieved) answered by :meth:`Pipeline.stream_pieces` on the worker thread; its text deltas and result
become OpenAI response bodies or server-sent events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..chat import Conversations, Turn, passage_pieces
from ..engine.options import DEFAULT_OPTIONS, InvalidOptionError, QueryOptions
from ..errors import StoreUnavailableError
from ..pipeline import Pipeline
from ..pipeline_answer import PipelineStream
from .errors import APIError, from_exception, install_handlers
from .responses import Shape, sse
from .schemas import ChatCompletionRequest, CommonRequest, CompletionRequest
from .worker import Delta, Done, Event, Failed, Job, QueueFull, Worker

DISCONNECT_POLL_S = 0.25  # how often a request checks that its client is still there, events arriving or not


@dataclass(frozen=True)
class ServerSettings:
    """Server-wide defaults; requests override the query options with extension fields."""

    model_name: str  # the id clients pass as "model"
    options: QueryOptions = DEFAULT_OPTIONS  # requests override single options with extension fields
    max_tokens: int = 256  # when a request sets neither max_tokens nor max_completion_tokens
    temperature: float = 0.0  # when a request sets none: greedy, the model's best answer
    max_queue: int = 32  # requests waiting for the worker; more are refused with 429
    timeout: float = 300.0  # seconds from arrival to the last token
    system_prompts: int = 4  # system prompts other than the default kept with an engine of their own

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


class Relay:
    """A request's side of its job: the next event, or an error once the deadline passes or the client leaves."""

    def __init__(self, job: Job, request: Request, timeout: float):
        self.job, self.request, self.timeout = job, request, timeout
        self._getter: asyncio.Future[Event] | None = None  # kept across polls: cancelling a get could drop an event
        self._next_check = time.monotonic()  # when to ask again whether the client is still there

    async def next(self) -> Event:
        while True:
            remaining = self.job.deadline - time.monotonic()
            if remaining <= 0:
                raise APIError(
                    504,
                    f"the answer did not finish within the server's {self.timeout:g} s timeout (--timeout); "
                    "ask for fewer max_tokens, or retry when the server is less busy",
                    kind="timeout_error",
                    code="timeout",
                )
            # Checked on a clock, not only when no event came in time: tokens that arrive faster than the poll
            # kept an unstreamed answer generating to its end for a client that had hung up.
            if (now := time.monotonic()) >= self._next_check:
                self._next_check = now + DISCONNECT_POLL_S
                if await self.request.is_disconnected():
                    raise ClientGone
            self._getter = self._getter or asyncio.ensure_future(self.job.events.get())
            done, _ = await asyncio.wait({self._getter}, timeout=min(remaining, self._next_check - now))
            if done:
                event, self._getter = self._getter.result(), None
                return event

    def close(self) -> None:
        """Stop the job (a no-op once it is done) and stop listening."""
        self.job.cancel()
        if self._getter is not None:
            self._getter.cancel()


def create_app(pipeline: Pipeline, settings: ServerSettings) -> FastAPI:
    worker = Worker(settings.max_queue, settings.timeout)
    conversations = Conversations(pipeline, settings.system_prompts)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()

    app = FastAPI(
        title="infoflow-rag", summary="OpenAI-compatible completions with passage KV reuse", lifespan=lifespan
    )
    app.state.worker = worker
    install_handlers(app)

    @app.get("/health")
    def health() -> dict:  # not async: FastAPI runs it in a thread, so a slow store round trip blocks no request
        store = store_problem(pipeline)
        return {
            "status": "degraded" if store else "ok",
            "store": store or "ok",  # while the store is down, answers come without reuse (cached_tokens 0)
            "model": settings.model_name,
            "queued": worker.queued,
            "running": worker.running is not None,
            "completed": worker.completed,
            "cancelled": worker.cancelled,
            "max_queue": settings.max_queue,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "infoflow-rag"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        options = _query_options(body, settings)

        def start() -> PipelineStream:
            query = body.messages[-1].text
            passages, sources, retrieve_s = _passages(pipeline, body, query)
            turns = [Turn(role=m.role, content=m.text) for m in body.messages]
            answering, pieces = conversations.pieces(turns, passages)
            generation = _generation(body, settings, answering.engine.max_positions)
            return answering.stream_pieces(pieces, sources, retrieve_s, options, **generation)

        return await _respond(worker, request, body, Shape(chat=True, model=settings.model_name), start, settings)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        options = _query_options(body, settings)

        def start() -> PipelineStream:
            passages, sources, retrieve_s = _passages(pipeline, body, body.text)
            pieces = passage_pieces(passages) + pipeline.split_prompt(body.text)
            generation = _generation(body, settings, pipeline.engine.max_positions)
            return pipeline.stream_pieces(pieces, sources, retrieve_s, options, **generation)

        return await _respond(worker, request, body, Shape(chat=False, model=settings.model_name), start, settings)

    return app


def store_problem(pipeline: Pipeline) -> str | None:
    """Why the KV store cannot be reached, or None. The pipeline treats a down store as a cache miss."""
    try:
        pipeline.store.contains(pipeline.key([]))
    except StoreUnavailableError as err:
        return str(err)
    return None


def _passages(pipeline: Pipeline, body: CommonRequest, query: str) -> tuple[list[str], list, float]:
    """The passages sent with the request, then those retrieved for ``query`` (``retrieve``: top k)."""
    if not body.retrieve:
        return list(body.passages), [], 0.0
    t = time.perf_counter()
    hits = [h for h in pipeline.retrieve(query, body.retrieve) if h.text not in body.passages]
    return [*body.passages, *(h.text for h in hits)], hits, time.perf_counter() - t


def _query_options(body: CommonRequest, settings: ServerSettings) -> QueryOptions:
    """The server's options with the ones the request sets laid over them, validated; a bad value is a 400."""
    try:
        return settings.options.replace(**body.option_overrides())
    except InvalidOptionError as err:
        raise APIError(400, str(err), param=err.option, code="invalid_value") from None


def _generation(body: CommonRequest, settings: ServerSettings, context_window: int) -> dict:
    """Generation settings: the request's values where it sets them, the server's defaults elsewhere."""
    if (max_tokens := _max_tokens(body, settings)) >= context_window:
        raise ValueError(
            f"max_tokens={max_tokens} leaves no room for the prompt in the model's {context_window}-token context "
            f"window; ask for fewer, e.g. {min(settings.max_tokens, context_window // 2)}"
        )

    def pick(value, default):
        return default if value is None else value

    return {
        "max_new_tokens": max_tokens,
        "temperature": pick(body.temperature, settings.temperature),
        "top_p": pick(body.top_p, 1.0),
        "seed": body.seed,
        "stop": body.stops,
    }


def _max_tokens(body: CommonRequest, settings: ServerSettings) -> int:
    return body.token_limit or settings.max_tokens


async def _respond(
    worker: Worker,
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    shape: Shape,
    start: Callable[[], PipelineStream],
    settings: ServerSettings,
):
    if body.model != settings.model_name:
        raise APIError(
            404,
            f"model {body.model!r} is not served here; send model={settings.model_name!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    try:
        job = worker.submit(start)
    except QueueFull as full:
        raise APIError(
            429,
            f"server busy: {full.queued} requests already wait for the model (--max-queue {worker.max_queue}); "
            f"retry after {full.retry_after} s",
            kind="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(full.retry_after)},
        ) from None
    relay = Relay(job, request, settings.timeout)
    try:
        first = await relay.next()
        if isinstance(first, Failed):
            raise from_exception(first.error)
    except ClientGone:
        relay.close()
        return JSONResponse({}, status_code=499)  # nobody reads it
    except BaseException:
        relay.close()
        raise
    if body.stream:
        events = _stream(first, relay, shape, body.include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        event = first
        while isinstance(event, Delta):
            event = await relay.next()
        if isinstance(event, Failed):
            raise from_exception(event.error)
        assert isinstance(event, Done)
        return shape.completion(event.answer, job.queue_s)
    except ClientGone:
        return JSONResponse({}, status_code=499)
    finally:
        relay.close()


async def _stream(first: Event, relay: Relay, shape: Shape, with_usage: bool) -> AsyncIterator[str]:
    try:
        if opening := shape.opening(with_usage):
            yield sse(opening)
        event = first
        while isinstance(event, Delta):
            yield sse(shape.chunk(event.text, with_usage=with_usage))
            event = await relay.next()
        if isinstance(event, Failed):  # the status line is long gone: report the error as an event
            yield sse(from_exception(event.error).response().body.decode())
            return
        for chunk in shape.closing(event.answer, relay.job.queue_s, with_usage):
            yield sse(chunk)
        yield sse("[DONE]")
    except APIError as err:  # timed out mid-stream
        yield sse(err.response().body.decode())
    except ClientGone:
        return
    finally:  # also when the client disconnects and the server cancels this generator
        relay.close()
