"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with a fitting HTTP status.

Clients (the openai package, LangChain, LlamaIndex) read ``error.message`` and raise by status, so every
refusal says which value was wrong and what to send instead.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def from_exception(err: Exception) -> APIError:
    """The API error for an exception raised while answering (in the worker)."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, ValueError):  # the library's way of refusing a bad value, with the fix in the message
        return APIError(400, str(err), code="invalid_value")
    log.exception("request failed", exc_info=err)
    return APIError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error")


def _validation_message(error: dict) -> tuple[str, str | None]:
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if error.get("type") == "json_invalid":
        detail = error.get("ctx", {}).get("error", "parse error")
        return f"malformed JSON in the request body ({detail}); send a JSON object", None
    if param is None and error.get("type") != "value_error":  # the body itself: empty, not JSON, not an object
        return (
            f"the request body must be a JSON object sent as Content-Type: application/json, got "
            f"{str(error.get('input'))[:80]!r}",
            None,
        )
    if error.get("type") == "missing":
        return f"{param} is required; see the OpenAI API reference for this endpoint", param
    if error.get("type") == "value_error":  # our validators' messages already name the value and the fix
        return str(error["ctx"]["error"]), param
    return f"{param}: {error.get('msg')}, got {error.get('input')!r}", param


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        message, param = _validation_message(errors[0]) if errors else ("invalid request body", None)
        return APIError(400, message, param=param).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {err.detail}"
        return APIError(err.status_code, message, kind=kind).response()
