"""A high-fidelity simulator of Ollama's HTTP API, for tests, demos and benchmarks.

Run it with ``python -m ollama_sim --port 0``, or in-process with::

    with ollama_sim.serve_in_thread(ollama_sim.SimConfig(no_delay=True)) as sim:
        ollama.Client(host=sim.url).generate(model="llama3.2", prompt="hi")
"""

from .cli import main
from .config import ConfigError, ModelSpec, SimConfig, default_models
from .server import Simulator, SimulatorThread, serve_in_thread

__all__ = [
    "ConfigError",
    "ModelSpec",
    "SimConfig",
    "Simulator",
    "SimulatorThread",
    "default_models",
    "main",
    "serve_in_thread",
]
