"""What the request says about the thing to build: its name, who uses it, and its scale.

The simulated agents write prose about the request, so they need it as a reader would: "the
ride-sharing app" (not a bag of keywords), whether it is an internal tool for employees or a
public service, and the figures the user gave, quoted as the user wrote them ("a million
users", "5,000 events per second", "20 TB of sales data"). Everything is a pure function of
the request text, so the answers stay deterministic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

# Nouns that name the thing being built; the words before them say what kind it is.
_HEADS = frozenset(
    """
    app apps application applications portal platform pipeline pipelines service services
    backend api apis site website blog shop store marketplace system dashboard tool network
    game lake warehouse intranet crm erp cms wiki forum engine hub gateway
    """.split()  # noqa: SIM905 - a word list reads better as prose
)
_COMPOUND_HEADS = ("store", "shop", "site")  # bookstore, webshop, microsite
# Words before the head that describe the audience, size or quality rather than the kind.
_NOT_KIND = frozenset(
    """
    a an the our my your their its this that new public internal private small simple tiny
    little large big huge global modern secure scalable highly available reliable basic
    company company's customer-facing internet-facing multi-tenant cloud cloud-native
    we i need needs want wants build building create design to for of with and some
    """.split()  # noqa: SIM905
)
_WORD = re.compile(r"[A-Za-z][\w'-]*|\d[\d,.]*|[^\w\s]")
_TAIL_STOP = frozenset(
    "with and that which where in on to so while using , ; . : ( ) !".split()  # noqa: SIM905
)

_INTERNAL = re.compile(
    r"\b(internal|intranet|in-house|employees?|staff|back[- ]office|corporate|workforce|hr|"
    r"payroll|our (?:teams?|company|organisation|organization))\b",
    re.IGNORECASE,
)
_PUBLIC = re.compile(
    r"\b(public|internet-facing|customer-facing|customers?|consumers?|shoppers?|riders?|"
    r"passengers?|visitors?|readers?|subscribers?|players?|citizens?)\b",
    re.IGNORECASE,
)

_NUMBER = (
    r"(?:(?:a|an|one|two|three|four|five|six|seven|eight|nine|ten|half a|a few|several)\s+"
    r"(?:hundred|thousand|million|billion)"
    r"|(?:hundreds|thousands|millions|billions) of"
    r"|\d[\d,]*(?:\.\d+)?\s?(?:k|m|bn|K|M)?(?:\s(?:hundred|thousand|million|billion))?)\+?"
)
_PEOPLE_NOUNS = (
    r"users|employees|staff|customers|riders|drivers|passengers|members|students|patients|"
    r"visitors|readers|subscribers|players|owners|shoppers|clients|citizens|people|accounts|"
    r"learners|tenants|sellers|buyers|guests"
)
_DEVICE_NOUNS = r"devices|sensors|vehicles|machines|meters|cameras|trackers|gateways"
_RATE_NOUNS = (
    r"requests|events|messages|transactions|orders|bookings|queries|calls|writes|reads|rides|"
    r"trips|payments|readings|records|page views|pageviews|uploads|jobs"
)
_QUALIFIER = r"(?:[a-z][a-z-]*\s){0,2}"
_PEOPLE = re.compile(rf"\b{_NUMBER}\s{_QUALIFIER}(?:{_PEOPLE_NOUNS})\b", re.IGNORECASE)
_DEVICES = re.compile(rf"\b{_NUMBER}\s{_QUALIFIER}(?:{_DEVICE_NOUNS})\b", re.IGNORECASE)
_RATE = re.compile(
    rf"\b{_NUMBER}\s{_QUALIFIER}(?:{_RATE_NOUNS})\s?(?:(?:per|a|an|each|every)\s|/\s?)"
    r"(?:second|sec|minute|min|hour|day|month|s)\b"
    rf"|\b{_NUMBER}\s?(?:rps|tps|qps|req/s)\b",
    re.IGNORECASE,
)
_DATA = re.compile(
    r"\b\d[\d,]*(?:\.\d+)?\s?(?:TB|GB|PB|TiB|GiB|PiB|terabytes?|gigabytes?|petabytes?)\b"
    r"(?:\s(?:of|in)\s(?:[a-z][a-z-]*\s){0,2}(?:data|records|files|logs|images|videos|"
    r"documents|telemetry|history|storage))?",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Scale:
    """The figures the request states, each as the user wrote it (None when not stated)."""

    people: str | None = None
    devices: str | None = None
    rate: str | None = None
    data: str | None = None

    @property
    def stated(self) -> tuple[str, ...]:
        return tuple(p for p in (self.people, self.devices, self.rate, self.data) if p)

    def summary(self) -> str | None:
        """The stated figures as one phrase ("a million users and 500 requests per second")."""
        parts = self.stated
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


@dataclass(frozen=True)
class Facts:
    """The request read as a reader would: the thing's name, its audience and its scale."""

    name: str  # "ride-sharing app", "HR portal", or "" when the request names no kind of thing
    internal: bool
    scale: Scale

    @property
    def subject(self) -> str:
        return f"the {self.name}" if self.name else "the system you described"


def _flat(text: str) -> str:
    return " ".join(text.split())


def _first(pattern: re.Pattern[str], text: str) -> str | None:
    match = pattern.search(text)
    return _flat(match[0]).rstrip(",.") if match else None


def _is_head(word: str) -> bool:
    lower = word.lower()
    return lower in _HEADS or (len(lower) > 6 and lower.endswith(_COMPOUND_HEADS))


def _as_written(word: str, first: bool) -> str:
    """Keep acronyms and names (IoT, HR, SMS); lower-case a word capitalised only because it
    opens the request."""
    if first and word[:1].isupper() and word[1:] == word[1:].lower():
        return word.lower()
    return word


def _tail(tokens: list[str], start: int) -> str:
    """A short "for a bakery" after the head, when it names who or what the thing is for."""
    if start + 2 >= len(tokens) or tokens[start].lower() != "for":
        return ""
    determiner, noun = tokens[start + 1], tokens[start + 2]
    if determiner.lower() not in ("a", "an") or not noun.isalpha():
        return ""
    if re.fullmatch(_NUMBER, f"{determiner} {noun}", re.IGNORECASE) or noun.lower() in (
        "few",
        "million",
        "thousand",
        "hundred",
    ):
        return ""
    after = tokens[start + 3].lower() if start + 3 < len(tokens) else ","
    return f" for {determiner.lower()} {noun}" if after in _TAIL_STOP else ""


def _name(text: str) -> str:
    tokens = _WORD.findall(text)
    for index, token in enumerate(tokens):
        if not _is_head(token):
            continue
        kind: list[str] = []
        position = index - 1
        while position >= 0 and len(kind) < 3:
            word = tokens[position]
            if not re.fullmatch(r"[A-Za-z][\w'-]*", word) or word.lower() in _NOT_KIND:
                break
            kind.insert(0, _as_written(word, position == 0))
            position -= 1
        head = _as_written(token, index == 0)
        if head.lower().endswith("s") and head.lower()[:-1] in _HEADS:
            head = head[:-1]  # "microservices" names a backend of services, keep the singular
        return " ".join([*kind, head]) + _tail(tokens, index + 1)
    return _leading_words(tokens)


def _leading_words(tokens: list[str]) -> str:
    """No kind named ("Payroll for 40 staff"): the opening words, as "the payroll system"."""
    words: list[str] = []
    for position, word in enumerate(tokens):
        lower = word.lower()
        if not re.fullmatch(r"[A-Za-z][\w'-]*", word) or lower in _TAIL_STOP or lower == "for":
            break
        if lower not in _NOT_KIND:
            words.append(_as_written(word, position == 0))
        if len(words) == 3:
            break
    return " ".join([*words, "system"]) if words else ""


@cache
def read_facts(request_text: str) -> Facts:
    text = _flat(request_text)
    internal = bool(_INTERNAL.search(text)) and not _PUBLIC.search(text)
    scale = Scale(
        people=_first(_PEOPLE, text),
        devices=_first(_DEVICES, text),
        rate=_first(_RATE, text),
        data=_first(_DATA, text),
    )
    return Facts(name=_name(text), internal=internal, scale=scale)


def sentence(text: str) -> str:
    """`text` ending with exactly one full stop (a user's answer may bring its own)."""
    stripped = text.rstrip()
    return stripped if stripped.endswith((".", "!", "?", "…")) else stripped + "."


def quoted(text: str) -> str:
    """The request in quotation marks, closing the sentence once: “… users.” or “… users”."""
    return f"“{text}”" if text.endswith((".", "!", "?", "…")) else f"“{text}”."
