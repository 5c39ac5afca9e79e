"""Generic, strict TOML → dataclass loading shared by the server and agent configs.

Every key is declared as a dataclass field (its `doc` metadata is the documentation);
unknown keys and wrong types fail with the file, the dotted key and the reason.
Environment overrides: `MESHID_<SECTION>__<KEY>` (sections joined by `__`, upper case),
e.g. `MESHID_SERVER__AGENT_API_PORT=9443`; top-level keys: `MESHID_TRUST_DOMAIN`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from meshid.errors import ConfigError

T = TypeVar("T")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
# No setting needs more; "99999999999d" as ca_ttl passed and the server failed at start with
# a traceback (a date past year 9999).
MAX_DURATION = 100 * 365 * 86400
ENV_PREFIX = "MESHID_"


class Duration(float):
    """Seconds; in TOML either a number of seconds or a string like "24h", "5m", "30s"."""


class Port(int):
    """A TCP port: 1-65535, or 0 for any free one. Checked when the config is read: a port
    out of range failed only at bind, with an error that named no config key."""


def parse_port(value: Any) -> Port:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port from 0 (any free port) to 65535, got {value}")
    return Port(value)


def parse_duration(value: Any) -> Duration:
    if isinstance(value, bool):
        raise ValueError("expected a duration like '1h' or a number of seconds")
    if isinstance(value, (int, float)):
        # TOML has inf and nan: nan passed every range check after this (it compares false).
        if not math.isfinite(value):
            raise ValueError(f"duration must be a finite number of seconds, got {value!r}")
        if value < 0:
            raise ValueError("duration must not be negative")
        return _bounded(Duration(value))
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return _bounded(Duration(float(m.group(1)) * _UNITS[m.group(2)]))
    raise ValueError(f"expected a duration like '1h', '5m', '30s' or seconds, got {value!r}")


def _bounded(d: Duration) -> Duration:
    if d > MAX_DURATION:
        raise ValueError(f"duration must be at most 100 years ({MAX_DURATION}s), got {d:g}s")
    return d


def doc(text: str, *, secret: bool = False, **kw: Any) -> Any:
    """Field helper: `x: int = doc("what it is", default=3)`; a `secret` one is left out of
    the repr (config objects end up in logs and error messages)."""
    meta = {"doc": text}
    if "default_factory" in kw:
        return dataclasses.field(default_factory=kw["default_factory"], metadata=meta, repr=not secret)
    return dataclasses.field(default=kw.get("default"), metadata=meta, repr=not secret)


def load_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc.strerror}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None


def build(cls: type[T], data: Mapping[str, Any], source: str, env: Mapping[str, str] | None = None) -> T:
    """Build dataclass `cls` from `data` (+ env overrides) or raise ConfigError naming file and key."""
    merged = _apply_env(cls, dict(data), os.environ if env is None else env, source)
    return _build(cls, merged, source, prefix="")


def _apply_env(cls: type, data: dict[str, Any], env: Mapping[str, str], source: str) -> dict[str, Any]:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in ("MESHID_SERVER_SOCKET", "MESHID_MASTER_SECRET"):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        target_cls: Any = cls
        ok = True
        for part in path:
            fields = (
                {f.name: f for f in dataclasses.fields(target_cls)}
                if dataclasses.is_dataclass(target_cls)
                else {}
            )
            if part not in fields:
                ok = False
                break
            target_cls = _resolve(target_cls, fields[part])
        if not ok:
            continue  # other MESHID_* variables are not config overrides
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _env_value(value, target_cls)
    return data


def _env_value(text: str, tp: Any) -> Any:
    """The typed value of an override; text that is not one is passed on as it is, for
    _convert to refuse naming the key (a typo must not become a quiet `false`)."""
    origin = typing.get_origin(tp)
    if tp is bool:
        word = text.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
        return text
    if tp in (int, Port):
        try:
            return int(text)
        except ValueError:
            return text
    if tp is float:  # was passed on as text: every float key's override failed
        try:
            return float(text)
        except ValueError:
            return text
    if origin in (list, tuple):
        return [s.strip() for s in text.split(",") if s.strip()]
    return text


def _resolve(owner: type, f: dataclasses.Field[Any]) -> Any:
    hints = typing.get_type_hints(owner)
    return hints[f.name]


def _build(cls: type[T], data: Mapping[str, Any], source: str, prefix: str) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: expected a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: {prefix}{key}: unknown key (known keys here: {known})")
    kwargs: dict[str, Any] = {}
    for name in fields:
        if name not in data:
            continue
        key = f"{prefix}{name}"
        try:
            kwargs[name] = _convert(hints[name], data[name], source, key)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{source}: {key}: {exc}") from None
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: {exc}") from None
    return obj


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, key + ".")  # type: ignore[arg-type]
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, source, key)
    if tp is Duration:
        return parse_duration(value)
    if tp is Port:
        return parse_port(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        if not math.isfinite(value):  # TOML's nan passed the range checks (e.g. global_rate)
            raise ValueError(f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        items = [_convert(inner, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r}")


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, doc, default) for every key: the source of the config reference docs."""
    out: list[tuple[str, str, Any]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(describe(tp, f"{prefix}{f.name}."))  # type: ignore[arg-type]
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        out.append((f"{prefix}{f.name}", f.metadata.get("doc", ""), default))
    return out


# --- checks shared by the server and agent configs -------------------------------------------
def check_identity_basics(trust_domain: str, data_dir: str) -> None:
    """trust_domain and data_dir are required on both sides; the trust domain must be valid."""
    from meshid.spiffe_id import TrustDomain

    if not trust_domain:
        raise ConfigError("trust_domain: required")
    try:
        TrustDomain.parse(trust_domain)
    except ValueError as exc:
        raise ConfigError(f"trust_domain: {exc}") from None
    if not data_dir:
        raise ConfigError("data_dir: required")


def check_spiffe_ids(values: list[str], key: str) -> None:
    from meshid.spiffe_id import SpiffeId

    for i, sid in enumerate(values):
        try:
            SpiffeId.parse(sid)
        except ValueError as exc:
            raise ConfigError(f"{key}[{i}]: {exc}") from None


def make_state_dir(path: Path) -> None:
    """Create `data_dir` (0700) at start-up, or fail naming it: a plain OSError said only
    "File exists" when the path was a file."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise ConfigError(f"data_dir {path}: exists and is not a directory") from None
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise ConfigError(f"data_dir {path}: cannot create it ({reason})") from None
