"""The HTTP API: TGI's routes (`tgi_routes`), OpenAI's routes (`openai_routes`), what they share (`common`) and
the checks in front of them (`guards`).

    app = create_app(state, HttpOptions(api_key="secret", cors_allow_origins=("https://ui.example",)))

Request bodies that do not parse are answered as TGI's router answers them: 400 for JSON that does not parse
(invalid UTF-8 and JSON nested too deeply included), 422 for a body of the wrong shape, both with a message
naming the problem. Every other error the framework raises (an unknown route, a method a route does not take)
and any unexpected exception keep TGI's shape, `{"error": ..., "error_type": ...}`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from loguru import logger
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from ..types import RouterState
from .common import VERSION
from .guards import ApiKeyGuard, PayloadLimit
from .openai_routes import OpenAIRoutes
from .tgi_routes import TGIRoutes

DEFAULT_PAYLOAD_LIMIT = 2_000_000  # bytes, TGI's


@dataclass(frozen=True)
class HttpOptions:
    api_key: str | None = None  # protects the generation and tokenize routes (guards.PROTECTED_ROUTES)
    cors_allow_origins: tuple[str, ...] = ()  # empty: any origin (TGI's default)
    payload_limit: int = DEFAULT_PAYLOAD_LIMIT


async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse(
            {"error": f"Failed to parse the request body as JSON: {errors}", "error_type": "validation"},
            status_code=400,
        )
    parts = []
    for e in errors:
        location = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{location}: {e.get('msg')}" if location else str(e.get("msg")))
    return JSONResponse(
        {
            "error": "Failed to deserialize the JSON body into the target type: " + "; ".join(parts),
            "error_type": "validation",
        },
        status_code=422,
    )


_HTTP_ERROR_TYPES = {400: "validation", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors in TGI's shape; a body it could not parse says why."""
    message = str(exc.detail)
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        message = f"Failed to parse the request body as JSON: it is not valid UTF-8 ({cause})"
    elif isinstance(cause, RecursionError):
        message = "Failed to parse the request body as JSON: it nests too deeply"
    elif cause is not None:
        message = f"Failed to parse the request body as JSON: {type(cause).__name__}: {cause}"
    error_type = _HTTP_ERROR_TYPES.get(exc.status_code, "validation" if exc.status_code < 500 else "internal")
    return JSONResponse({"error": message, "error_type": error_type}, status_code=exc.status_code, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.opt(exception=exc).error(f"{request.method} {request.url.path} failed: {type(exc).__name__}: {exc}")
    return JSONResponse({"error": f"internal error: {type(exc).__name__}", "error_type": "internal"}, status_code=500)


def create_app(state: RouterState, options: HttpOptions = HttpOptions()) -> FastAPI:
    app = FastAPI(
        title="Text Generation Inference (InternLM2)",
        version=VERSION,
        description="TGI-compatible text generation API",
        openapi_url="/api-doc/openapi.json",
        docs_url="/docs",
    )
    app.add_exception_handler(RequestValidationError, _bad_body)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(TGIRoutes(state).router())
    app.include_router(OpenAIRoutes(state).router())
    # the last added runs first: CORS answers preflights before the key is asked for, and the body limit
    # applies only to requests that passed the key check
    app.add_middleware(PayloadLimit, limit=options.payload_limit)
    if options.api_key:
        app.add_middleware(ApiKeyGuard, api_key=options.api_key)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(options.cors_allow_origins) or ["*"],
        allow_methods=["GET", "POST"],
        allow_headers=["content-type", "authorization"],
    )
    return app
