"""The ``/_sim/`` control API: stats, reset, faults, events and run-time config."""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import ConfigError, describe, keep_alive_from_json
from .faults import FaultConfigError
from .gojson import decode_json_body, dumps
from .golike import GoError
from .http import Request, Response
from .parts import Handlers

MAX_EVENT_WAIT_S = 60.0
_TIMING_FIELDS = ("load_s", "tokens_per_s", "first_token_s")


class AdminApi(Handlers):
    """Handlers under ``/_sim/``. They are not counted in the Ollama request statistics."""

    async def dispatch(self, request: Request, response: Response) -> None:
        key = (request.method, request.path.rstrip("/"))
        try:
            if key == ("GET", "/_sim/stats"):
                return _json(response, 200, self.stats_snapshot())
            if key == ("POST", "/_sim/reset"):
                return _json(response, 200, self.reset())
            if key == ("GET", "/_sim/faults"):
                return _json(response, 200, self.faults.snapshot())
            if key == ("PUT", "/_sim/faults"):
                self.faults.replace(_body(request))
                return _json(response, 200, self.faults.snapshot())
            if key == ("POST", "/_sim/faults"):
                self.faults.merge(_body(request))
                return _json(response, 200, self.faults.snapshot())
            if key == ("GET", "/_sim/events"):
                return _json(response, 200, await self.read_events(request.query))
            if key == ("GET", "/_sim/config"):
                return _json(response, 200, describe(self.config))
            if key == ("PUT", "/_sim/config"):
                self.update_config(_body(request))
                return _json(response, 200, describe(self.config))
        except (FaultConfigError, ConfigError, GoError, ValueError, TypeError) as exc:
            return _json(response, 400, {"error": str(exc)})
        _json(response, 404, {"error": f"no admin route {request.method} {request.path}"})

    def stats_snapshot(self) -> dict[str, Any]:
        out = self.stats.snapshot()
        out["pending"] = self.scheduler.pending
        models = {}
        waiting_loads = self.scheduler.pending_by_model()
        for spec in self.config.models:
            runner = self.scheduler.runners.get(spec.name)
            default_slots = 1 if spec.has("embedding") else self.config.num_parallel
            models[spec.name] = {
                "loaded": bool(runner and not runner.loading),
                "slots": runner.slots.size if runner else default_slots,
                "busy_slots": runner.slots.busy if runner else 0,
                "waiting": (runner.slots.waiting if runner else 0)
                + waiting_loads.get(spec.name, 0),
                **self.stats.meter(spec.name).snapshot(),
            }
        out["models"] = models
        return out

    def reset(self) -> dict[str, str]:
        self.faults.clear()
        self.scheduler.unload_all()
        self.stats.reset()
        self.events.clear()
        return {"status": "ok"}

    async def read_events(self, query: dict[str, str]) -> dict[str, Any]:
        since = int(query.get("since", "0"))
        wait = min(MAX_EVENT_WAIT_S, max(0.0, float(query.get("wait", "0"))))
        events = await self.events.wait_since(since, wait)
        return {"events": events, "next": events[-1]["seq"] if events else max(since, 0)}

    def update_config(self, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError("the config update must be a JSON object")
        allowed = {
            "num_parallel",
            "max_queue",
            "max_loaded_models",
            "keep_alive",
            "no_delay",
            "speed",
            "models",
        }
        unknown = set(data) - allowed
        if unknown:
            raise ConfigError(f"unknown or read-only config fields: {sorted(unknown)}")
        for key in ("num_parallel", "max_queue", "max_loaded_models"):
            if key in data:
                value = int(data[key])
                if value < (0 if key == "max_queue" else 1):
                    raise ConfigError(f"{key} is out of range")
                setattr(self.config, key, value)
        if "keep_alive" in data:
            self.config.keep_alive_s = keep_alive_from_json(data["keep_alive"])
        if "no_delay" in data:
            self.config.no_delay = bool(data["no_delay"])
        if "speed" in data:
            self.config.speed = float(data["speed"])
        for name, timings in (data.get("models") or {}).items():
            spec = self.config.find_model(name)
            if spec is None or not isinstance(timings, dict):
                raise ConfigError(f"unknown model {name!r} or bad timings")
            if set(timings) - set(_TIMING_FIELDS):
                raise ConfigError(f"only {list(_TIMING_FIELDS)} can change at run time")
            changes: dict[str, Any] = {k: float(v) for k, v in timings.items()}
            updated = dataclasses.replace(spec, **changes)
            self.config.models[self.config.models.index(spec)] = updated


def _body(request: Request) -> Any:
    try:
        return decode_json_body(request.body)
    except EOFError:
        return {}


def _json(response: Response, status: int, obj: Any) -> None:
    response.send(status, dumps(obj).encode())
