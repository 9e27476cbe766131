"""Frozen, validated configuration dataclasses (docs/architecture.md).

Every experiment and run configuration subclasses :class:`Config`. Construction validates: a subclass implements
``validate()`` and calls :func:`require`, which raises :class:`ConfigError` naming the field, the value and what is
allowed. Configs load from dicts, YAML or TOML files and ``key=value`` overrides (``--set`` on the CLI), with the
value parsed according to the field's annotation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, packaged as tomli
    import tomli as tomllib

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and what is allowed."""


def require(condition: bool, field: str, value: Any, allowed: str) -> None:
    """Raise ``ConfigError`` unless ``condition``: ``"field 'lr' = -1.0 is invalid: allowed: > 0"``."""
    if not condition:
        raise ConfigError(f"field {field!r} = {value!r} is invalid; allowed: {allowed}")


def parse_scalar(text: str) -> Any:
    """Parse a CLI token: int, float, bool (true/false), none, a [list], or else the string itself."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        pass
    if t.startswith("[") and t.endswith("]"):
        try:
            return json.loads(t)
        except json.JSONDecodeError:
            inner = t[1:-1].strip()
            return [parse_scalar(x) for x in inner.split(",")] if inner else []
    return t


def _coerce(field: str, value: Any, annotation: Any) -> Any:
    """Coerce ``value`` (possibly a string from the CLI or a list from YAML) to the field's annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(field, value, a)
            except (ConfigError, TypeError, ValueError) as e:
                errors.append(str(e))
        raise ConfigError(f"field {field!r} = {value!r} has the wrong type; expected {annotation}")
    if origin is typing.Literal:
        v = parse_scalar(value) if isinstance(value, str) and not all(isinstance(a, str) for a in args) else value
        require(v in args, field, value, f"one of {list(args)}")
        return v
    if origin in (tuple, list):
        if isinstance(value, str):
            s = value.strip()
            if s.startswith("["):
                value = parse_scalar(s)
            else:
                value = [parse_scalar(x) for x in s.split(",") if x.strip()] if s else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(field, v, args[0]) for v in value)
        if origin is tuple and args:
            require(len(value) == len(args), field, value, f"a sequence of {len(args)} values")
            return tuple(_coerce(field, v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        out = [_coerce(field, v, inner) for v in value]
        return tuple(out) if origin is tuple else out
    if annotation is bool:
        if isinstance(value, str):
            value = parse_scalar(value)
        require(isinstance(value, bool), field, value, "true or false")
        return value
    if annotation is int:
        if isinstance(value, str):
            value = parse_scalar(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        require(isinstance(value, int) and not isinstance(value, bool), field, value, "an integer")
        return value
    if annotation is float:
        if isinstance(value, str):
            value = parse_scalar(value)
        require(isinstance(value, (int, float)) and not isinstance(value, bool), field, value, "a number")
        require(math.isfinite(float(value)), field, value, "a finite number (not NaN or infinity)")
        return float(value)
    if annotation is str:
        return str(value)
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class for frozen configs. Subclasses are ``@dataclass(frozen=True)`` and override ``validate``."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            coerced = _coerce(f.name, v, hints.get(f.name, Any))
            if coerced is not v:
                object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:  # pragma: no cover - default accepts everything
        """Check field values; call :func:`require` for each constraint."""

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        """The dataclass field names, in order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], base: C | None = None) -> C:
        """Build from a mapping; unknown keys raise ``ConfigError`` listing the valid ones."""
        names = cls.field_names()
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown} for {cls.__name__}; valid fields: {names}")
        if base is not None:
            return dataclasses.replace(base, **data)
        return cls(**data)

    @classmethod
    def from_file(cls: type[C], path: str | Path, base: C | None = None) -> C:
        """Load a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file of field values."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        if not path.is_file():
            raise ConfigError(f"config file {path} is not a file")
        if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
            raise ConfigError(f"config file {path}: unknown format {path.suffix!r}; use .yaml, .yml or .toml")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        except yaml.YAMLError as e:  # includes ConstructorError for tags such as !!python/object (never executed)
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of field: value, not a {type(data).__name__}")
        bad_keys = [k for k in data if not isinstance(k, str)]
        if bad_keys:
            raise ConfigError(f"config file {path}: field names must be strings, got {bad_keys}")
        return cls.from_dict(data, base=base)

    def with_overrides(self: C, overrides: Iterable[str]) -> C:
        """Apply ``key=value`` strings (values parsed by field type)."""
        updates: dict[str, Any] = {}
        for tok in overrides:
            if "=" not in tok:
                raise ConfigError(f"malformed override {tok!r}: expected key=value")
            k, v = tok.split("=", 1)
            k = k.strip()
            if not k:
                raise ConfigError(f"malformed override {tok!r}: empty key")
            updates[k] = v
        return type(self).from_dict(updates, base=self)

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Field values as plain data (tuples as lists), the content of ``config.yaml``."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def to_yaml(self) -> str:
        """:meth:`to_dict` as YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def reject_non_finite(kwargs: dict[str, Any], what: str) -> None:
    """ConfigError if a spec's keyword arguments hold NaN or infinity (``mlp:gain=nan``), naming the key."""
    def bad(v: Any) -> bool:
        if isinstance(v, (list, tuple)):
            return any(bad(x) for x in v)
        return isinstance(v, float) and not math.isfinite(v)

    wrong = [f"{k} = {v!r}" for k, v in kwargs.items() if bad(v)]
    if wrong:
        raise ConfigError(f"{what}: {', '.join(wrong)} is not a finite number")
