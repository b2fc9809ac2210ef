"""Deterministic, L2-normalised embedding vectors."""

from __future__ import annotations

import math
import random

from .textgen import seed_for


def embed(model: str, text: str, dimensions: int) -> list[float]:
    """A unit vector that depends only on the model, the text and the size."""
    rng = random.Random(seed_for("embed", model, text))
    vector = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [round(x / norm, 8) for x in vector]
