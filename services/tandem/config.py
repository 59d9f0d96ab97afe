"""A job's config (plain values for a task's train and evaluate) and agents' labels:
validation, the wire form, and parsing them from the command line.

A config maps keys ([A-Za-z_][A-Za-z0-9_.-]{0,63}, at most 64 of them) to a string (at
most 1 KiB), an integer (int64), a finite float or a bool; encoded, at most 16 KiB. What a
task sees is the job's training fields (epochs, batch_size, learning_rate, mu)
overlaid with the user's config: the user's value wins (`merged`).

Labels are `key=value` pairs an agent is started with (`--label`) and jobs select
agents by (`--select`): keys and values of [A-Za-z0-9_.-], at most 63 characters.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path

from tandem.v1 import coordinator_pb2 as pb

# A job's config: plain values only. Defined here, not in tandem.task (which re-exports
# them): the command line imports this module, and must not import torch for it.
ConfigValue = str | int | float | bool
Config = Mapping[str, ConfigValue]

KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
MAX_ENTRIES = 64
MAX_TEXT_BYTES = 1024
MAX_ENCODED_BYTES = 16 << 10
_INT64 = (-(1 << 63), (1 << 63) - 1)
LABEL = re.compile(r"[A-Za-z0-9_.-]{1,63}")
MAX_LABELS = 64


class ConfigError(ValueError):
    """A config, label or selector that is not valid; the message says which and why."""


def check(config: Mapping[str, object]) -> dict[str, ConfigValue]:
    """`config` as a plain dict, or ConfigError naming the first thing wrong with it."""
    if len(config) > MAX_ENTRIES:
        raise ConfigError(f"config has {len(config)} entries; at most {MAX_ENTRIES}")
    out: dict[str, ConfigValue] = {}
    for key, value in config.items():
        if not isinstance(key, str) or not KEY.fullmatch(key):
            raise ConfigError(f"config key {key!r} is not valid: keys match [A-Za-z_][A-Za-z0-9_.-]{{0,63}}")
        if isinstance(value, bool):
            out[key] = value
        elif isinstance(value, int):
            if not _INT64[0] <= value <= _INT64[1]:
                raise ConfigError(f"config {key}: integer {value} is outside int64")
            out[key] = value
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ConfigError(f"config {key}: numbers must be finite, got {value}")
            out[key] = value
        elif isinstance(value, str):
            if len(value.encode()) > MAX_TEXT_BYTES:
                raise ConfigError(f"config {key}: a string of {len(value.encode())} bytes; at most {MAX_TEXT_BYTES}")
            out[key] = value
        else:
            raise ConfigError(f"config {key}: {type(value).__name__} is not a plain value "
                              "(a string, integer, number or true/false)")
    size = encoded_size(out)
    if size > MAX_ENCODED_BYTES:
        raise ConfigError(f"config is {size} bytes encoded; at most {MAX_ENCODED_BYTES}")
    return out


def encoded_size(config: Config) -> int:
    """Bytes of the config's wire form (a map field of its own)."""
    task = pb.TrainTask()
    to_proto(config, task.config)
    return task.ByteSize()


def to_proto(config: Config, target: MutableMapping[str, pb.ConfigValue]) -> None:
    """Write `config` into a protobuf map field of ConfigValue."""
    for key, value in config.items():
        if isinstance(value, bool):
            target[key].flag = value
        elif isinstance(value, int):
            target[key].integer = value
        elif isinstance(value, float):
            target[key].number = value
        else:
            target[key].text = value


def from_proto(source: Mapping[str, pb.ConfigValue]) -> dict[str, ConfigValue]:
    """A map of ConfigValue as python values (an unset value is ConfigError)."""
    out: dict[str, ConfigValue] = {}
    for key, value in source.items():
        kind = value.WhichOneof("kind")
        if kind is None:
            raise ConfigError(f"config {key}: no value set")
        out[key] = getattr(value, kind)
    return out


def merged(base: Config, user: Config) -> dict[str, ConfigValue]:
    """What a task sees: `base` (the job's training fields) overlaid with the user's config."""
    return {**base, **user}


def parse_value(text: str) -> ConfigValue:
    """A command-line value: an int, a float, true/false, else the string itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return text


def parse_pairs(pairs: Iterable[str], base: Mapping[str, ConfigValue] | None = None) -> dict[str, ConfigValue]:
    """`KEY=VALUE` pairs over `base` (a --config-file's content), checked."""
    out: dict[str, ConfigValue] = dict(base or {})
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--config {pair!r}: expected KEY=VALUE")
        out[key] = parse_value(value)
    return check(out)


def load_file(path: Path) -> dict[str, ConfigValue]:
    """A flat JSON object of plain values, checked."""
    try:
        loaded = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--config-file {path}: cannot read it: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config-file {path}: not JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config-file {path}: expected a JSON object of plain values")
    try:
        return check(loaded)
    except ConfigError as exc:
        raise ConfigError(f"--config-file {path}: {exc}") from None


def parse_label(text: str, flag: str = "--label") -> tuple[str, str]:
    """`key=value` with a key and value of [A-Za-z0-9_.-]{1,63}."""
    key, sep, value = text.partition("=")
    if not sep or not LABEL.fullmatch(key) or not LABEL.fullmatch(value):
        raise ConfigError(f"{flag} {text!r}: expected KEY=VALUE, each 1-63 characters of [A-Za-z0-9_.-]")
    return key, value


def parse_labels(texts: Iterable[str], flag: str = "--label") -> dict[str, str]:
    """Labels (or selectors) from `key=value` strings; at most 64."""
    out = dict(parse_label(text, flag) for text in texts)
    if len(out) > MAX_LABELS:
        raise ConfigError(f"{flag}: {len(out)} given; at most {MAX_LABELS}")
    return out


def matches(labels: Mapping[str, str], selectors: Mapping[str, str]) -> bool:
    """Whether an agent's labels satisfy every selector."""
    return all(labels.get(key) == value for key, value in selectors.items())


# What an update's header may carry as the task's train metrics (the coordinator
# refuses more; agents keep within it: `update_metrics`).
MAX_UPDATE_METRICS = 64
MAX_METRIC_NAME = 64


def update_metrics(values: Mapping[str, object]) -> tuple[dict[str, float], list[str]]:
    """The metrics an update may carry: finite numbers under names of 1..MAX_METRIC_NAME
    characters, at most MAX_UPDATE_METRICS of them (by name); and the names left out."""
    kept: dict[str, float] = {}
    dropped: list[str] = []
    for name in sorted(map(str, values)):
        value = values[name]
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
        if 0 < len(name) <= MAX_METRIC_NAME and math.isfinite(number) and len(kept) < MAX_UPDATE_METRICS:
            kept[name] = number
        else:
            dropped.append(name)
    return kept, dropped
