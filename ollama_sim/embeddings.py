"""Deterministic, L2-normalised embedding vectors."""

from __future__ import annotations

import hashlib
import math
from array import array

from .textgen import seed_for


def embed(model: str, text: str, dimensions: int) -> list[float]:
    """A unit vector that depends only on the model, the text and the size.

    Its components come straight from a hash of the three, in C: an embedding model's work is
    the GPU's, so a call of hundreds of inputs must cost the simulator's CPU next to nothing
    beside the time its catalogue gives (which it sleeps)."""
    seed = seed_for("embed", model, text).to_bytes(8, "big")
    components = array("h", hashlib.shake_128(seed).digest(2 * dimensions))
    scale = 1e8 / (math.hypot(*components) or 1.0)
    return [round(x * scale) / 1e8 for x in components]  # 8 decimals, as round(v, 8) but fast
