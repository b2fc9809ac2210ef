"""The Ollama API routes other than generate and chat: health, version, tags, ps, show, pull,
embed."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .completion import Completions, send_error
from .config import OLLAMA_VERSION, ModelSpec
from .embeddings import embed
from .gojson import dumps
from .golike import local_timestamp, parse_model_name
from .http import NDJSON_TYPE, TEXT_TYPE, ClientDisconnected, Request, Response
from .parts import Handlers, SimParts
from .scheduler import RunnerOptions, ServerBusy
from .validation import EMBED, EMBEDDINGS, PULL, SHOW, ApiError, check_options, decode

Route = Callable[[Request, Response], Awaitable[None]]
PULL_STEP_S = 0.02
"""Simulated time between pull progress lines."""


def details(spec: ModelSpec) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": spec.family,
        "families": list(spec.families or (spec.family,)),
        "parameter_size": spec.parameter_size,
        "quantization_level": spec.quantization,
    }


class OllamaApi(Handlers):
    """Route table and handlers for the Ollama endpoints."""

    def __init__(self, parts: SimParts) -> None:
        super().__init__(parts)
        completions = Completions(parts)
        self.routes: dict[str, dict[str, Route]] = {
            "/": {"GET": self.root, "HEAD": self.root},
            "/api/version": {"GET": self.version, "HEAD": self.version},
            "/api/tags": {"GET": self.tags, "HEAD": self.tags},
            "/api/ps": {"GET": self.ps},
            "/api/show": {"POST": self.show},
            "/api/pull": {"POST": self.pull},
            "/api/generate": {"POST": completions.generate},
            "/api/chat": {"POST": completions.chat},
            "/api/embed": {"POST": self.embed},
            "/api/embeddings": {"POST": self.embeddings},
        }

    async def dispatch(self, request: Request, response: Response) -> None:
        methods = self.routes.get(request.path)
        if methods is None:
            response.send(404, b"404 page not found", TEXT_TYPE)
            return
        handler = methods.get(request.method)
        if handler is None:
            response.send(405, b"405 method not allowed", TEXT_TYPE)
            return
        try:
            await handler(request, response)
        except ApiError as exc:
            send_error(response, self.events, request, exc.status, exc.message)

    # --- simple reads --------------------------------------------------------------------------

    async def root(self, request: Request, response: Response) -> None:
        response.send(200, b"Ollama is running", TEXT_TYPE)

    async def version(self, request: Request, response: Response) -> None:
        response.send(200, dumps({"version": OLLAMA_VERSION}).encode())

    async def tags(self, request: Request, response: Response) -> None:
        models = [
            {
                "name": spec.name,
                "model": spec.name,
                "modified_at": local_timestamp(spec.modified_unix_s),
                "size": spec.size_bytes,
                "digest": spec.digest,
                "details": details(spec),
            }
            for spec in self.config.models
        ]
        response.send(200, dumps({"models": models}).encode())

    async def ps(self, request: Request, response: Response) -> None:
        models = [
            {
                "name": runner.spec.name,
                "model": runner.spec.name,
                "size": runner.spec.size_bytes,
                "digest": runner.spec.digest,
                "details": details(runner.spec),
                "expires_at": local_timestamp(runner.expires_at),
                "size_vram": runner.spec.size_bytes,
                "context_length": runner.options.num_ctx,
            }
            for runner in self.scheduler.loaded_models()
        ]
        response.send(200, dumps({"models": models}).encode())

    async def show(self, request: Request, response: Response) -> None:
        body = decode(request.body, SHOW)
        model = body.get("model") or body.get("name") or ""
        if not model:
            raise ApiError(400, "model is required")
        if parse_model_name(model) is None:
            raise ApiError(400, "invalid model name")
        spec = self.config.find_model(model)
        if spec is None:
            raise ApiError(404, f"model '{model}' not found")
        response.send(200, dumps(_show(spec)).encode())

    # --- pull ----------------------------------------------------------------------------------

    async def pull(self, request: Request, response: Response) -> None:
        body = decode(request.body, PULL)
        name = body.get("model") or body.get("name") or ""
        parsed = parse_model_name(name)
        if parsed is None:
            raise ApiError(400, "invalid model name")
        spec = self.config.find_model(name)
        if body.get("stream") is False:
            for _ in _pull_lines(spec):
                await asyncio.sleep(self.config.delay(PULL_STEP_S))
            if spec is None:
                raise ApiError(500, "pull model manifest: file does not exist")
            response.send(200, dumps({"status": "success"}).encode())
            return
        response.prepare_stream(200, NDJSON_TYPE)
        await response.write(b'{"status":"pulling manifest"}\n')
        if spec is None:
            await asyncio.sleep(self.config.delay(PULL_STEP_S))
            await response.write(b'{"error":"pull model manifest: file does not exist"}\n')
            await response.end()
            return
        for line in _pull_lines(spec):
            await asyncio.sleep(self.config.delay(PULL_STEP_S))
            await response.write(dumps(line).encode() + b"\n")
        await response.end()

    # --- embeddings ----------------------------------------------------------------------------

    async def embed(self, request: Request, response: Response) -> None:
        start_ns = time.perf_counter_ns()
        body = decode(request.body, EMBED)
        raw_input = body.get("input")
        if isinstance(raw_input, str):
            inputs = [raw_input] if raw_input else []
        elif isinstance(raw_input, list) and all(isinstance(i, str) for i in raw_input):
            inputs = raw_input
        elif raw_input is None:
            inputs = []
        else:
            raise ApiError(400, "invalid input type")
        if len(inputs) > self.config.max_embed_inputs:  # the simulator's own bound on a reply
            raise ApiError(
                400,
                f"the simulator embeds at most {self.config.max_embed_inputs} "
                "inputs per request (max_embed_inputs); send fewer",
            )
        model = body.get("model") or ""
        spec, options = self._embedding_model(model, body)
        if body.get("truncate") is False:
            for text in inputs:
                if len(text.split()) > spec.context_length:
                    raise ApiError(400, "the input length exceeds the context length")
        vectors, load_ns = await self._embed(request, spec, options, body["keep_alive"], inputs)
        dims = body.get("dimensions")
        if dims and 0 < dims < spec.embedding_dim:
            vectors = [_renormalise(v[:dims]) for v in vectors]
        out: dict[str, Any] = {"model": model, "embeddings": vectors}
        if inputs:
            out["total_duration"] = time.perf_counter_ns() - start_ns
            out["load_duration"] = load_ns
            out["prompt_eval_count"] = sum(len(t.split()) + 2 for t in inputs)
        response.send(200, dumps(out).encode())

    async def embeddings(self, request: Request, response: Response) -> None:
        """The legacy single-prompt endpoint."""
        body = decode(request.body, EMBEDDINGS)
        model = body.get("model") or ""
        spec, options = self._embedding_model(model, body)
        prompt = body.get("prompt") or ""
        vectors, _ = await self._embed(
            request, spec, options, body["keep_alive"], [prompt] if prompt else []
        )
        response.send(200, dumps({"embedding": vectors[0] if vectors else []}).encode())

    def _embedding_model(
        self, model: str, body: dict[str, Any]
    ) -> tuple[ModelSpec, dict[str, Any]]:
        spec = self.config.find_model(model)
        if spec is None:
            raise ApiError(404, f"model '{model}' not found")
        if not spec.has("embedding"):
            raise ApiError(400, f"{dumps(model)} does not support embeddings")
        return spec, check_options(body.get("options"))

    async def _embed(
        self,
        request: Request,
        spec: ModelSpec,
        options: dict[str, Any],
        keep_alive_s: float | None,
        inputs: list[str],
    ) -> tuple[list[list[float]], int]:
        start_ns = time.perf_counter_ns()
        fault = self.faults.plan("embed", spec.name, "\n".join(inputs))
        for name in fault.applied:
            self.stats.faults_injected[name] += 1
            self.events.emit("fault", request_id=request.request_id, model=spec.name, fault=name)
        stage = "queued"
        try:
            try:
                runner = await self.scheduler.acquire(
                    spec,
                    RunnerOptions.from_options(spec, options, self.config.default_num_ctx),
                    keep_alive_s,
                    request.request_id,
                )
            except ServerBusy as exc:
                raise ApiError(503, str(exc)) from exc
            load_ns = max(1, time.perf_counter_ns() - start_ns)
            try:
                if not inputs:
                    return [], load_ns
                stage = "waiting_slot"
                await runner.slots.acquire()
                try:
                    stage = "embedding"
                    batches = 1 + len(inputs) // 16
                    await asyncio.sleep(self.config.delay(spec.first_token_s * batches))
                    if fault.first_byte_delay_s:
                        await asyncio.sleep(fault.first_byte_delay_s)
                    if fault.status is not None:
                        raise ApiError(fault.status, fault.error)
                    vectors = [embed(spec.name, t, spec.embedding_dim) for t in inputs]
                    self.events.emit(
                        "embed", request_id=request.request_id, model=spec.name, inputs=len(inputs)
                    )
                    return vectors, load_ns
                finally:
                    runner.slots.release()
            finally:
                self.scheduler.release(runner)
        except (asyncio.CancelledError, ClientDisconnected):
            self.record_disconnect(request, spec.name, stage)
            raise


def _renormalise(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [round(x / norm, 8) for x in vector]


def _layer_digest(spec: ModelSpec, kind: str) -> str:
    return hashlib.sha256(f"{spec.name}/{kind}".encode()).hexdigest()


def _pull_lines(spec: ModelSpec | None) -> list[dict[str, Any]]:
    """Progress lines after "pulling manifest", as ``server/download.go`` reports them."""
    if spec is None:
        return []
    lines: list[dict[str, Any]] = []
    layers = [("model", spec.size_bytes), ("template", 1429), ("license", 7711), ("params", 96)]
    for kind, total in layers:
        digest = _layer_digest(spec, kind)
        base = {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}", "total": total}
        steps = (0, total // 3, 2 * total // 3, total) if kind == "model" else (total,)
        for completed in steps:
            line = dict(base)
            if completed:
                line["completed"] = completed
            lines.append(line)
    lines += [
        {"status": "verifying sha256 digest"},
        {"status": "writing manifest"},
        {"status": "success"},
    ]
    return lines


def _show(spec: ModelSpec) -> dict[str, Any]:
    arch = spec.family.replace("-", "_")
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.basename": spec.name.split(":")[0],
        "general.file_type": 15,
        "general.parameter_count": _parameter_count(spec.parameter_size),
        "general.quantization_version": 2,
        f"{arch}.context_length": spec.context_length,
        f"{arch}.embedding_length": spec.embedding_dim or 4096,
        f"{arch}.block_count": 32,
    }
    template = (
        "{{ .Prompt }}"
        if spec.has("embedding")
        else ("{{- if .System }}{{ .System }}{{ end }}{{ .Prompt }}{{ .Response }}")
    )
    return {
        "license": "Simulated model licence text.",
        "modelfile": f'# Modelfile generated by "ollama show"\nFROM {spec.name}\n'
        f'TEMPLATE """{template}"""\n',
        "parameters": 'stop                           "<|eot_id|>"',
        "template": template,
        "details": details(spec),
        "model_info": info,
        "capabilities": list(spec.capabilities),
        "modified_at": local_timestamp(spec.modified_unix_s),
    }


def _parameter_count(size: str) -> int:
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
    try:
        return int(float(size[:-1]) * scale[size[-1].upper()])
    except (ValueError, KeyError, IndexError):
        return 0
