"""What the simulator says: the request type a responder sees, tokenisation, default answers.

Kept free of any server or Django code so a test or a settings-chosen responder can import
it cheaply and produce text that is deterministic for a given model and conversation.
"""

import hashlib
import json
import random
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ChatRequest",
    "Responder",
    "count_prompt_tokens",
    "default_responder",
    "message_text",
    "tokenize",
]


@dataclass(frozen=True)
class ChatRequest:
    """One chat-completions request, normalised so OpenAI and Azure calls look the same."""

    model: str
    messages: list[dict[str, Any]]
    temperature: float | None
    max_tokens: int | None
    stream: bool
    include_usage: bool
    response_format: dict[str, Any] | None
    deployment: str | None
    body: dict[str, Any]


Responder = Callable[[ChatRequest], str]
"""Returns the full completion text for a request; must be deterministic.

The server also accepts a responder returning an awaitable of str, for tests that need one.
"""

AsyncResponder = Callable[[ChatRequest], Awaitable[str]]

# Words and punctuation, each with the whitespace before it; a trailing run of whitespace
# is a token of its own so that "".join(tokenize(text)) == text always holds.
_TOKEN_RE = re.compile(r"\s*(?:\w+|[^\w\s])|\s+")

# Per-message overhead in the prompt count, in the spirit of OpenAI's chat accounting.
_TOKENS_PER_MESSAGE = 4
_TOKENS_PER_PROMPT = 3


def tokenize(text: str) -> list[str]:
    """Split text into stream-sized tokens; joining them gives the text back unchanged."""
    return _TOKEN_RE.findall(text)


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a message whose content is a string or a list of typed parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            part.get("text", "")
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        ]
        return " ".join(parts)
    return ""


def count_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Prompt usage: the same tokenisation over every message, plus a little per message."""
    total = _TOKENS_PER_PROMPT
    for message in messages:
        total += _TOKENS_PER_MESSAGE + len(tokenize(message_text(message)))
    return total


# --- the default responder ------------------------------------------------------------------

_STOPWORDS = frozenset(
    """
    about above after again against also among because been before being below between both
    but cannot could does doing down during each every from further have having here hers
    herself himself into itself just more most much must myself only other ought ours
    ourselves over please same should some such than that their theirs them themselves then
    there these they this those through under until very want were what when where which
    while whom why will with within without would your yours yourself yourselves give tell
    make need like using used into onto upon many few lots kind sort thing things design
    explain describe write create provide suggest propose list show help build outline
    """.split()  # noqa: SIM905 - a long word list reads better as prose
)

_OPENERS = (
    "Here is a concise take on {a}.",
    "Considering {a}, a few points stand out.",
    "Short answer on {a}: it depends on the constraints, but there is a sensible default.",
    "Good question about {a}; let us break it down.",
)
_BODY = (
    "Start with {b}, because it shapes everything that follows.",
    "Keep {b} and {c} loosely coupled so each can evolve on its own.",
    "Measure {b} early, since assumptions about {c} tend to be wrong.",
    "A managed service usually handles {b} better than a hand-rolled one.",
    "Plan for failure around {c}: retries, timeouts and clear ownership.",
    "Document the trade-offs of {b} so the team can revisit them later.",
    "Cost matters too: size {c} for the expected load, not the worst case.",
    "Security for {b} should be designed in, with least privilege by default.",
)
_CLOSERS = (
    "In short, {a} is manageable with a clear plan.",
    "That should give a solid starting point for {a}.",
    "Revisit {a} once real usage data is available.",
)


def _seed(request: ChatRequest) -> int:
    """A stable seed from model and conversation, independent of PYTHONHASHSEED."""
    blob = json.dumps([request.model, request.messages], sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big")


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message)
    return message_text(messages[-1]) if messages else ""


def _keywords(text: str, limit: int = 4) -> list[str]:
    """The first distinct significant words, so the answer visibly echoes the request."""
    seen: dict[str, str] = {}
    for match in re.finditer(r"[A-Za-z][A-Za-z0-9_-]{3,}", text):
        word = match[0]
        key = word.lower()
        before = text[max(0, match.start() - 8) : match.start()].rstrip()[-1:]
        if word.istitle() and before in ("", ".", "!", "?"):
            word = key  # capitalised only because it starts a sentence
        if key in _STOPWORDS or key in seen:
            continue
        seen[key] = word
        if len(seen) == limit:
            break
    return list(seen.values())


def _paragraph(keywords: list[str], rng: random.Random) -> str:
    words = keywords or ["your request"]
    a = words[0]
    b = words[1 % len(words)]
    c = words[2 % len(words)]
    sentences = [rng.choice(_OPENERS).format(a=a)]
    sentences += [s.format(b=b, c=c) for s in rng.sample(_BODY, rng.randint(2, 3))]
    sentences.append(rng.choice(_CLOSERS).format(a=a))
    return " ".join(sentences)


def _json_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    if not response_format or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return schema if isinstance(schema, dict) else None


def _wants_json(response_format: dict[str, Any] | None) -> bool:
    return bool(response_format) and response_format.get("type") in ("json_object", "json_schema")


class _SchemaFiller:
    """Builds a value matching a JSON schema, so structured-output parsing succeeds offline."""

    _LONG_TEXT_NAMES = frozenset(
        {"answer", "summary", "content", "text", "description", "explanation", "rationale"}
    )

    def __init__(self, root: dict[str, Any], rng: random.Random, paragraph: str, words: list[str]):
        self.root = root
        self.rng = rng
        self.paragraph = paragraph
        self.words = words or ["item"]

    def _resolve(self, ref: str) -> dict[str, Any]:
        node: Any = self.root
        for part in ref.removeprefix("#/").split("/"):
            if not part:
                continue
            node = node.get(part, {}) if isinstance(node, dict) else {}
        return node if isinstance(node, dict) else {}

    def fill(self, schema: dict[str, Any], name: str = "", depth: int = 0) -> Any:
        if depth > 12:
            return None
        if isinstance(schema.get("$ref"), str):
            return self.fill(self._resolve(schema["$ref"]), name, depth + 1)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return self.rng.choice(schema["enum"])
        for key in ("anyOf", "oneOf", "allOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                usable = [o for o in options if isinstance(o, dict) and o.get("type") != "null"]
                return self.fill((usable or options)[0], name, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in schema else "string"
        return self._fill_kind(kind, schema, name, depth)

    def _fill_kind(self, kind: str, schema: dict[str, Any], name: str, depth: int) -> Any:
        if kind == "object":
            props = schema.get("properties") or {}
            return {
                key: self.fill(sub if isinstance(sub, dict) else {}, key, depth + 1)
                for key, sub in props.items()
            }
        if kind == "array":
            items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
            low = int(schema.get("minItems", 1))
            high = max(low, int(schema.get("maxItems", max(low, 3))))
            count = self.rng.randint(low, min(high, max(low, 3)))
            return [self.fill(items, name, depth + 1) for _ in range(count)]
        if kind == "integer":
            low = int(schema.get("minimum", 1))
            return self.rng.randint(low, int(schema.get("maximum", low + 9)))
        if kind == "number":
            low = float(schema.get("minimum", 0.0))
            return round(self.rng.uniform(low, float(schema.get("maximum", low + 1.0))), 2)
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "null":
            return None
        if name.lower() in self._LONG_TEXT_NAMES:
            return self.paragraph
        return " ".join(self.rng.sample(self.words, min(2, len(self.words))))


def default_responder(request: ChatRequest) -> str:
    """A short, plausible paragraph echoing the request's key words; JSON when JSON is asked.

    The text depends only on model and messages, so repeated runs produce identical output.
    """
    rng = random.Random(_seed(request))
    words = _keywords(_last_user_text(request.messages))
    paragraph = _paragraph(words, rng)
    if not _wants_json(request.response_format):
        return paragraph
    schema = _json_schema(request.response_format)
    if schema is None:
        return json.dumps({"answer": paragraph})
    return json.dumps(_SchemaFiller(schema, rng, paragraph, words).fill(schema))
