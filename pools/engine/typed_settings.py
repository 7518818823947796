"""Frozen config dataclasses built from plain settings mappings, by their fields.

A config dataclass is the one place its defaults are written: each field declares its default,
its bounds and the environment variable behind it (`setting`), and `build` reads a mapping of
UPPER_CASE keys into it, converting by the field's annotation (values from the environment
arrive as text). Every problem is collected instead of stopping at the first, each naming the
setting the way the user wrote it, so that one system check can show them all.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin, get_type_hints

from pools.engine.exceptions import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_RULE = "pools.engine.typed_settings.rule"
# A field that could not be read and has no default: the dataclass cannot be built.
_FAILED = object()


@dataclass(frozen=True)
class Rule:
    """What a setting may hold beyond its type, and where the user sets it."""

    key: str | None = None  # the mapping's key; None: the field's name in capitals
    # The environment variable, named in errors. None: the section's prefix and the key (no
    # prefix, none); "": the setting has no variable.
    env: str | None = None
    low: float | None = None  # at least
    above: float | None = None  # strictly more than
    high: float | None = None  # at most
    below: float | None = None  # strictly less than
    unit: str = ""  # "seconds": said in the error
    clamp: bool = False  # a number out of bounds becomes the nearest bound, not an error
    internal: bool = False  # never read from the mapping: the parser sets it

    def admits(self, value: float) -> bool:
        return not (
            (self.low is not None and value < self.low)
            or (self.above is not None and value <= self.above)
            or (self.high is not None and value > self.high)
            or (self.below is not None and value >= self.below)
        )

    def nearest(self, value: float) -> float:
        if self.low is not None:
            value = max(self.low, value)
        return value if self.high is None else min(self.high, value)

    def expected(self, noun: str) -> str:
        """`a whole number of at least 1`, `a number from 0 to 2`, `a positive number`."""
        noun += f" of {self.unit}" if self.unit else ""
        if self.above == 0 and self.high is None and self.below is None:
            return f"a positive {noun}"
        if self.low is not None and self.high is not None:
            return f"a {noun} from {self.low:g} to {self.high:g}"
        bounds = [
            f"of at least {self.low:g}" if self.low is not None else "",
            f"above {self.above:g}" if self.above is not None else "",
            f"at most {self.high:g}" if self.high is not None else "",
            f"below {self.below:g}" if self.below is not None else "",
        ]
        return " ".join([f"a {noun}", " and ".join(filter(None, bounds))]).strip()


def setting(
    default: Any = MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    shown: bool = True,
    **rule: Any,
) -> Any:
    """A config field: its default (none: the setting is required) and its `Rule`."""
    metadata = {_RULE: Rule(**rule)}
    if factory is not None:
        return field(default_factory=factory, repr=shown, metadata=metadata)
    return field(default=default, repr=shown, metadata=metadata)


def internal(default: Any = MISSING) -> Any:
    """A field the parser sets itself, never a key of the mapping."""
    return setting(default, internal=True)


def is_blank(value: object) -> bool:
    """None or empty text: the setting is not given, its default applies."""
    return value is None or (isinstance(value, str) and not value.strip())


class ConfigErrors(ConfigError):
    """Several configuration problems at once."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        first = errors[0]
        super().__init__(first.setting, "; ".join(str(e) for e in errors))


def setting_keys(kind: type[DataclassInstance]) -> list[str]:
    """The keys a mapping for `kind` may hold."""
    return [_key(f) for f in fields(kind) if not _rule(f).internal]


def parse[T: DataclassInstance](kind: type[T], raw: object, where: str = "") -> T:
    """`build`, raising `ConfigErrors` listing every problem."""
    errors: list[ConfigError] = []
    built = build(kind, raw, where, errors)
    if errors or built is None:
        raise ConfigErrors(errors or [ConfigError(where or kind.__name__, "is incomplete")])
    return built


def build[T: DataclassInstance](
    kind: type[T],
    raw: object,
    where: str,
    errors: list[ConfigError],
    *,
    env_prefix: str = "",
    given: Mapping[str, Any] | None = None,
) -> T | None:
    """`kind` from the mapping `raw` (keys in capitals), problems appended to `errors`.

    `where` names the mapping in errors (`CARLOS_POOLS['HTTP']`); `env_prefix` names the
    variables of fields that declare none (`HTTP_`). `given` sets fields by name, unread. A
    bad value keeps the field's default; None when a field without one could not be read.
    """
    given = dict(given or {})
    if is_blank(raw):
        raw = {}
    if not isinstance(raw, Mapping):
        errors.append(ConfigError(where, "must be a dictionary"))
        raw = {}
    settable = {_key(f): f for f in fields(kind) if not _rule(f).internal}
    for key in sorted(str(key) for key in set(raw) - set(settable)):
        errors.append(
            ConfigError(_place(where, key), f"unknown key; expected one of {sorted(settable)}")
        )
    hints = _hints(kind)
    values = dict(given)
    for key, spec in settable.items():
        if spec.name not in given:
            values[spec.name] = _read(
                hints[spec.name], spec, raw.get(key), where, env_prefix, errors
            )
    if _FAILED in values.values():
        return None
    return kind(**{name: value for name, value in values.items() if value is not MISSING})


def setting_name(where: str, key: str, rule: Rule, env_prefix: str = "") -> str:
    """`CARLOS_POOLS['HTTP']['READ_TIMEOUT'] (HTTP_READ_TIMEOUT)`: how errors name a setting."""
    variable = rule.env if rule.env is not None else (env_prefix + key if env_prefix else "")
    place = _place(where, key)
    return f"{place} ({variable})" if variable else place


def _place(where: str, key: str) -> str:
    return f"{where}['{key}']" if where else key


def _key(spec: Field[Any]) -> str:
    return _rule(spec).key or spec.name.upper()


def _rule(spec: Field[Any]) -> Rule:
    rule = spec.metadata.get(_RULE)
    return rule if isinstance(rule, Rule) else Rule()


@functools.cache
def _hints(kind: type) -> dict[str, Any]:
    return get_type_hints(kind)


def _has_default(spec: Field[Any]) -> bool:
    return spec.default is not MISSING or spec.default_factory is not MISSING


class _Invalid(ValueError):
    """A value of the wrong kind: what was expected, and the value as the user wrote it."""

    def __init__(self, expected: str, value: object) -> None:
        super().__init__(expected)
        self.expected = expected
        self.value = value


def _read(
    hint: Any,
    spec: Field[Any],
    value: object,
    where: str,
    env_prefix: str,
    errors: list[ConfigError],
) -> Any:
    """One field's value; MISSING keeps its default, _FAILED: no value and no default."""
    rule = _rule(spec)
    name = setting_name(where, _key(spec), rule, env_prefix)
    fallback = MISSING if _has_default(spec) else _FAILED
    if is_blank(value):
        if fallback is _FAILED:
            errors.append(ConfigError(name, "is required"))
        return fallback
    hint, optional = _unwrap_optional(hint)
    if isinstance(hint, type) and is_dataclass(hint):
        nested = build(hint, value, _place(where, _key(spec)), errors, env_prefix=rule.env or "")
        return fallback if nested is None else nested
    try:
        return _convert(hint, value, rule)
    except _Invalid as problem:
        expected = f"empty or {problem.expected}" if optional else problem.expected
        errors.append(ConfigError(name, f"must be {expected}, got {problem.value!r}"))
        return fallback


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """`int | None` is `int`, optional: an empty value means None (the default)."""
    if get_origin(hint) in (Union, types.UnionType):
        inner = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(inner) == 1:
            return inner[0], True
    return hint, False


def _convert(hint: Any, value: object, rule: Rule) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Invalid("1 or 0 (true or false)", value)
    if hint is int or hint is float:
        expected = rule.expected("whole number" if hint is int else "number")
        number = _number(value, hint)
        if number is None:
            raise _Invalid(expected, value)
        if not rule.admits(number):
            if not rule.clamp:
                raise _Invalid(expected, number)
            number = rule.nearest(number)
        return hint(number)
    if hint is str:
        if not isinstance(value, str):
            raise _Invalid("text", value)
        return value.strip()
    if get_origin(hint) is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise _Invalid("a list or comma-separated text", value)
        item_hint = get_args(hint)[0]
        return tuple(_convert(item_hint, item, rule) for item in items if not is_blank(item))
    raise TypeError(f"no conversion from settings to {hint!r}")


def _number(value: object, kind: type[int] | type[float]) -> float | None:
    """The number in `value` (text from the environment converted), else None."""
    if isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if kind is int:
        return value if isinstance(value, int) else None
    return value if math.isfinite(value) else None
