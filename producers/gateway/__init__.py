"""The HTTP gateway: a native task API with SSE, and an Ollama-compatible facade, on FastAPI."""

from producers.gateway.app import create_app
from producers.gateway.config import GatewayConfig, load_core_settings, load_gateway_config

__all__ = ["GatewayConfig", "create_app", "load_core_settings", "load_gateway_config"]
