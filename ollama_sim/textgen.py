"""Deterministic, English-looking model output.

Tokens are words with a leading space (the first token of a reply has none) or bare punctuation,
which is roughly how real tokenizers stream text. The same seed always gives the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable
from typing import Any

from .gojson import dumps_deep

_DET = ["the", "a", "this", "each", "every", "one", "that", "some"]
_ADJ = [
    "good",
    "simple",
    "small",
    "large",
    "clear",
    "common",
    "useful",
    "important",
    "new",
    "early",
    "quick",
    "careful",
    "steady",
    "busy",
    "quiet",
]
_NOUN = [
    "model",
    "system",
    "answer",
    "question",
    "worker",
    "queue",
    "server",
    "request",
    "token",
    "stream",
    "result",
    "pattern",
    "method",
    "signal",
    "design",
    "layer",
    "record",
    "message",
    "process",
    "value",
    "client",
    "job",
    "cache",
]
_VERB = [
    "helps",
    "makes",
    "keeps",
    "shows",
    "uses",
    "needs",
    "finds",
    "explains",
    "describes",
    "supports",
    "handles",
    "improves",
    "changes",
    "shapes",
    "guides",
]
_PREP = ["of", "in", "for", "with", "through", "across", "under", "behind", "around", "near"]
_ADV = ["often", "usually", "clearly", "quickly", "quietly", "simply", "mostly", "rarely"]
_CONJ = ["and", "but", "so", "while", "because"]
_OPENERS = (
    "Sure",
    "Well",
    "In short",
    "Generally",
    "Here is the idea",
    "To be clear",
    "Overall",
    "Interestingly",
    "In practice",
    "Simply put",
)
_THINK_OPENERS = (
    "Okay, the user is asking about",
    "Hmm, let me think about",
    "Alright, I need to consider",
    "Let me work through",
    "First, I should understand",
)
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'-]{3,}")
_STOPWORDS = frozenset(
    [
        "what",
        "which",
        "where",
        "when",
        "with",
        "that",
        "this",
        "from",
        "have",
        "about",
        "there",
        "their",
        "would",
        "could",
        "should",
        "please",
        "tell",
        "write",
        "explain",
        "describe",
        "give",
        "make",
        "your",
        "into",
        "them",
        "they",
        "then",
        "than",
    ]
)


def seed_for(*parts: Any) -> int:
    """A stable 64-bit seed from JSON-serialisable parts."""
    try:
        blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    except RecursionError:  # a format or tool arguments nested deeper than Python recurses
        blob = dumps_deep(parts, True, str)
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big")


def keywords(text: str, limit: int = 4) -> list[str]:
    """A few content words from the prompt, so replies look on-topic."""
    found: list[str] = []
    seen: set[str] = set()
    for word in _WORD_RE.findall(text):
        lower = word.lower()
        if lower not in _STOPWORDS and lower not in seen:
            seen.add(lower)
            found.append(word if word[1:].islower() and word[0].isupper() and found else lower)
        if len(found) >= limit:
            break
    return found


def words_to_tokens(words: Iterable[str], first: bool = True) -> list[str]:
    """Turn words and punctuation into tokens with leading spaces."""
    tokens: list[str] = []
    for word in words:
        if word in {".", ",", "?", "!", ":", ";"} or not tokens and first:
            tokens.append(word)
        else:
            tokens.append(" " + word)
        first = first and not tokens
    return tokens


class TextSource:
    """An endless, deterministic stream of sentence tokens."""

    def __init__(self, rng: random.Random, topic: list[str]) -> None:
        self._rng = rng
        self._topic = topic
        self._first = True

    def _noun_phrase(self) -> list[str]:
        rng = self._rng
        words = [rng.choice(_DET)]
        if rng.random() < 0.4:
            words.append(rng.choice(_ADJ))
        if self._topic and rng.random() < 0.25:
            words.append(rng.choice(self._topic))
        else:
            words.append(rng.choice(_NOUN))
        if words[0] == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        return words

    def _clause(self) -> list[str]:
        rng = self._rng
        words = self._noun_phrase()
        if rng.random() < 0.3:
            words.append(rng.choice(_ADV))
        words.append(rng.choice(_VERB))
        words += self._noun_phrase()
        if rng.random() < 0.5:
            words.append(rng.choice(_PREP))
            words += self._noun_phrase()
        return words

    def sentence(self, opener: str | None = None) -> list[str]:
        """One sentence of tokens, e.g. ``["The", " quick", " worker", " helps", ...]``."""
        rng = self._rng
        words: list[str] = []
        if opener:
            words += [*opener.split(), ","]
        words += self._clause()
        if rng.random() < 0.35:
            words += [",", rng.choice(_CONJ), *self._clause()]
        words[0] = words[0][:1].upper() + words[0][1:]
        words.append("." if rng.random() < 0.9 else "!")
        tokens = words_to_tokens(words, first=self._first)
        self._first = False
        return tokens

    def tokens(self, count: int) -> list[str]:
        """Exactly ``count`` tokens (cut mid-sentence if need be)."""
        out: list[str] = []
        while len(out) < count:
            out.extend(self.sentence())
        return out[:count]

    def natural(self, low: int = 20, high: int = 80, opener: bool = True) -> list[str]:
        """A reply that ends at a sentence boundary after about ``low..high`` tokens."""
        target = self._rng.randint(low, high)
        out = self.sentence(self._rng.choice(_OPENERS) if opener else None)
        while len(out) < target:
            out.extend(self.sentence())
        return out


def reply_source(seed: int, prompt: str) -> TextSource:
    """A text source for a reply to ``prompt``."""
    return TextSource(random.Random(seed), keywords(prompt))


def thinking_tokens(seed: int, prompt: str) -> list[str]:
    """A short, deterministic chain of thought."""
    rng = random.Random(seed ^ 0x5EED)
    topic = keywords(prompt) or ["this"]
    source = TextSource(rng, topic)
    tokens = source.sentence(rng.choice(_THINK_OPENERS) + " " + topic[0])
    target = rng.randint(15, 40)
    while len(tokens) < target:
        tokens.extend(source.sentence())
    return tokens


def json_tokens(text: str) -> list[str]:
    """Split JSON text into small token-like pieces whose concatenation is the text."""
    return _JSON_PIECE.findall(text)


_JSON_PIECE = re.compile(r'\s+|[{}\[\],:]|"[^"\\]{0,6}|[^\s{}\[\],:"]{1,6}|"')
