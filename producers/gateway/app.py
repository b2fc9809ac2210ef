"""The gateway's app factory: the native ``/v1`` API, the Ollama facade, the playground."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from producers.gateway import batches_api, facade, native, openai_api
from producers.gateway.config import GatewayConfig, load_core_settings, load_gateway_config
from producers.gateway.deps import gateway_of
from producers.gateway.errors import error_response, refusal_response
from producers.gateway.limits import Refusal
from producers.gateway.openai_replies import REQUEST_ID, openai_error
from producers.gateway.service import Gateway
from tasks.errors import CorralError, InvalidRequest
from tasks.kinds import registry
from tasks.settings import Settings

PLAYGROUND = Path(__file__).parent / "playground"


class IPAllowList:
    """Refuses clients outside ``CORRAL_GATEWAY_IP_ALLOW`` (403) before anything else runs."""

    def __init__(self, app: ASGIApp, config: GatewayConfig) -> None:
        self.app = app
        self.networks = config.allowed_networks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.networks and not self._allowed(scope):
            response = JSONResponse({"error": "your address is not allowed"}, status_code=403)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        client = scope.get("client")
        try:
            address = ipaddress.ip_address(client[0]) if client else None
        except ValueError:
            return False
        return address is not None and any(address in net for net in self.networks)


def create_app(
    settings: Settings | None = None,
    config: GatewayConfig | None = None,
    *,
    require_auth: bool = False,
) -> FastAPI:
    """A gateway app. ``require_auth`` demands a key even while none is configured."""
    settings = settings or load_core_settings()
    config = config or load_gateway_config()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.gateway = Gateway(settings, config, require_auth=require_auth)
        try:
            yield
        finally:
            await app.state.gateway.close()

    # /docs and /redoc load their scripts and styles from this package, not from a CDN: they
    # work offline and behind a strict egress firewall (the assets: /static-offline-docs).
    app = FastAPIOffline(
        title="ollama-corral gateway",
        version=_version(),
        description="Queue generate, chat, structured and multimodal tasks for Ollama; follow "
        "them over Server-Sent Events. The Ollama-compatible routes (/api/...) are served on "
        "the same port and documented in docs/gateway.md.",
        lifespan=lifespan,
    )
    app.add_middleware(IPAllowList, config=config)
    app.include_router(native.build_router())
    app.include_router(facade.build_router())
    app.include_router(openai_api.build_router())
    app.include_router(batches_api.build_router())
    _add_error_handlers(app)
    _add_plain_routes(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _add_plain_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["health"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Redis answers",
        responses={503: {"model": native.ErrorBody}},
    )
    async def readyz(request: Request) -> JSONResponse:
        try:
            await gateway_of(request).redis.ping()
        except (redis.RedisError, OSError) as exc:
            return JSONResponse(
                {"error": {"type": "BrokerUnavailable", "message": str(exc), "retryable": True}},
                status_code=503,
            )
        return JSONResponse({"status": "ready"})

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(PLAYGROUND / "index.html")

    app.mount("/playground", StaticFiles(directory=PLAYGROUND), name="playground")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Refusal)
    async def on_refusal(request: Request, exc: Refusal) -> JSONResponse:
        return refusal_response(request, exc)

    @app.exception_handler(CorralError)
    async def on_error(request: Request, exc: CorralError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> Response:
        return _not_routed(request, exc) or await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return error_response(request, InvalidRequest(f"invalid request: {problems}"))


def _not_routed(request: Request, exc: HTTPException) -> Response | None:
    """An unknown path (404) or method (405) answered as the API under its prefix would:
    Ollama's bare text under ``/api``, OpenAI's error object under ``/v1``."""
    path, status = request.url.path, exc.status_code
    if status not in (404, 405):
        return None
    if path == "/api" or path.startswith("/api/"):
        text = "404 page not found" if status == 404 else "405 method not allowed"
        return PlainTextResponse(text, status_code=status, headers=exc.headers)
    if path == "/v1" or path.startswith("/v1/"):
        what = "Invalid URL" if status == 404 else "Method not allowed"
        message = f"{what} ({request.method} {path}); docs/gateway.md lists the routes served"
        headers = {**(exc.headers or {}), REQUEST_ID: f"req_{uuid.uuid4().hex}"}
        return openai_error(status, message, headers=headers)
    return None


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus each kind's payload model as its request body's schema."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for kind in registry:
        body = kind.payload.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in body.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        schemas[kind.payload.__name__] = body
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    schema["security"] = [{"bearer": []}, {}]
    app.openapi_schema = schema
    return schema


def _version() -> str:
    try:
        return version("ollama-corral")
    except PackageNotFoundError:
        return "0"


__all__ = ["create_app"]
