"""Road-segment readings (`.npz` files from the SUMO side) and the speed forecaster's examples.

A readings file holds, for D days of T intervals each and E road segments (SUMO edges):

    speed       float32 [D, T, E]   mean speed in the interval, m/s
    occupancy   float32 [D, T, E]   percent of the interval the segment was occupied, 0-100
    flow        float32 [D, T, E]   vehicles per interval
    free_speed  float32 [E]         the segment's speed limit, m/s (> 0)
    edges       str [E]             the segments' ids
    interval    float               seconds per interval (optional: 60)
    district    int                 the district, -1 for all of them (optional: -1)

An example is one segment at one time t of one day with a full history behind it:
x = its last WINDOW intervals (t-WINDOW+1 .. t) of FEATURES (speed / free_speed,
occupancy / 100, flow / FLOW_SCALE, and the time of day of each interval as the sine
and cosine of 2 pi tau / T), and y = its speed / free_speed HORIZONS intervals after t.
Dividing speeds by the speed limit lets segments of every limit, in every district,
share one model; forecasts go back to speeds as ratio * free_speed. The time of day is
the fraction of the recorded day (T intervals), so a model is meant for readings of
the same T and interval as it was trained on.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WINDOW = 10  # intervals of history per example
HORIZONS = (1, 5, 10)  # intervals ahead: 1, 5 and 10 minutes at 60 s
FLOW_SCALE = 30.0  # vehicles per interval that map to 1.0 (a busy urban lane at 60 s)
FEATURES = ("speed_ratio", "occupancy", "flow", "time_sin", "time_cos")
KMH_PER_MS = 3.6
REQUIRED = ("speed", "occupancy", "flow", "free_speed", "edges")
OPTIONAL = ("interval", "district")


@dataclass(frozen=True)
class Readings:
    """The arrays of one readings file (see the module's docstring), checked."""

    speed: np.ndarray
    occupancy: np.ndarray
    flow: np.ndarray
    free_speed: np.ndarray
    edges: np.ndarray
    interval: float = 60.0
    district: int = -1

    @property
    def days(self) -> int:
        return int(self.speed.shape[0])

    @property
    def intervals(self) -> int:
        """T: intervals per day."""
        return int(self.speed.shape[1])

    @property
    def num_edges(self) -> int:
        return int(self.speed.shape[2])

    @classmethod
    def of(cls, arrays: Mapping[str, Any], source: str = "readings") -> Readings:
        """Checked float32 copies of `arrays` (a mapping such as an open .npz file); a
        one-line ValueError starting with `source` for anything that breaks the format."""
        missing = [key for key in REQUIRED if key not in arrays]
        if missing:
            raise ValueError(f"{source}: missing arrays {missing} (a readings file has {list(REQUIRED)}, "
                             f"optionally {list(OPTIONAL)}; it has {sorted(arrays)})")
        series = {key: np.asarray(arrays[key]) for key in ("speed", "occupancy", "flow")}
        shape = series["speed"].shape
        for key, array in series.items():
            if array.ndim != 3 or array.shape != shape:
                raise ValueError(f"{source}: {key} must be [days, intervals, edges] like speed {list(shape)}, "
                                 f"got {list(array.shape)}")
            if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
                raise ValueError(f"{source}: {key} must hold real numbers, got dtype {array.dtype}")
            series[key] = array.astype(np.float32)
            bad = int(np.count_nonzero(~np.isfinite(series[key])))
            if bad:
                raise ValueError(f"{source}: {key} has {bad} values that are NaN or infinite")
            negative = int(np.count_nonzero(series[key] < 0))
            if negative:
                raise ValueError(f"{source}: {key} has {negative} negative values")
        if 0 in shape:
            raise ValueError(f"{source}: speed {list(shape)} holds no readings")
        free_speed = np.asarray(arrays["free_speed"])
        if free_speed.shape != (shape[2],) or not np.issubdtype(free_speed.dtype, np.number):
            raise ValueError(f"{source}: free_speed must be numbers [edges] = [{shape[2]}], "
                             f"got {free_speed.dtype} {list(free_speed.shape)}")
        free_speed = free_speed.astype(np.float32)
        if not (np.isfinite(free_speed) & (free_speed > 0)).all():
            raise ValueError(f"{source}: free_speed must be finite and > 0 m/s on every edge, "
                             f"got {int(np.count_nonzero(~(free_speed > 0)))} that are not")
        edges = np.asarray(arrays["edges"])
        if edges.shape != (shape[2],) or edges.dtype.kind not in "US":
            raise ValueError(f"{source}: edges must be strings [edges] = [{shape[2]}], "
                             f"got {edges.dtype} {list(edges.shape)}")
        interval = _scalar(arrays, "interval", 60.0, source)
        if not math.isfinite(interval) or interval <= 0:
            raise ValueError(f"{source}: interval must be a number of seconds > 0, got {interval}")
        district = _scalar(arrays, "district", -1, source)
        if not float(district).is_integer() or district < -1:
            raise ValueError(f"{source}: district must be an integer >= -1, got {district}")
        return cls(series["speed"], series["occupancy"], series["flow"], free_speed, edges.astype(str),
                   float(interval), int(district))

    @classmethod
    def load(cls, path: Path | str) -> Readings:
        """The readings file at `path`; a one-line ValueError naming it when it is missing,
        not an .npz file, or not in the format."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        try:
            with path.open("rb") as file:
                if file.read(4) != b"PK\x03\x04":
                    raise ValueError("it is not a zip archive (np.savez writes one)")
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            if "allow_pickle" in first:  # an object array: edges saved as Python objects
                first = "it holds an object array (save edges as a str array, e.g. np.array(ids, dtype=str))"
            raise ValueError(f"{path}: not a readable .npz file of readings: {first}") from None
        return cls.of(arrays, str(path))

    def save(self, path: Path | str) -> None:
        """Write these readings as an .npz file in the format `load` reads."""
        np.savez(path, speed=self.speed, occupancy=self.occupancy, flow=self.flow, free_speed=self.free_speed,
                 edges=self.edges.astype(str), interval=np.float64(self.interval), district=np.int64(self.district))


def _scalar(arrays: Mapping[str, Any], key: str, default: float, source: str) -> float:
    if key not in arrays:
        return default
    value = np.asarray(arrays[key])
    if value.size != 1 or not np.issubdtype(value.dtype, np.number):
        raise ValueError(f"{source}: {key} must be one number, got {value.dtype} {list(value.shape)}")
    return float(value.reshape(()))


def horizon_names(interval: float) -> tuple[str, ...]:
    """Each horizon's name for metrics: '1min', '5min', '10min' at 60 s; whole seconds
    ('30s') where a horizon is not a whole number of minutes."""
    names = []
    for steps in HORIZONS:
        seconds = steps * interval
        names.append(f"{round(seconds / 60)}min" if math.isclose(seconds % 60, 0, abs_tol=1e-6) or
                     math.isclose(seconds % 60, 60, abs_tol=1e-6) else f"{round(seconds)}s")
    return tuple(names)


def min_intervals() -> int:
    """The fewest intervals a day needs for one example."""
    return WINDOW + max(HORIZONS)


def window_features(speed: np.ndarray, occupancy: np.ndarray, flow: np.ndarray, free_speed: np.ndarray,
                    t: int, intervals: int) -> np.ndarray:
    """The model's input for every edge at time `t` (x [E, WINDOW, len(FEATURES)], float32)
    from the last WINDOW readings ([WINDOW, E] each, oldest first, the last one at
    interval `t` of a day of `intervals`): what a road-side unit keeps and sends."""
    shape = (WINDOW, len(free_speed))
    for key, array in (("speed", speed), ("occupancy", occupancy), ("flow", flow)):
        if np.shape(array) != shape:
            raise ValueError(f"{key} must be [WINDOW, edges] = {list(shape)}, got {list(np.shape(array))}")
    ratio = np.asarray(speed, np.float32) / np.asarray(free_speed, np.float32)
    angle = 2 * np.pi * (np.arange(t - WINDOW + 1, t + 1) % intervals) / intervals
    clock = np.broadcast_to(np.stack([np.sin(angle), np.cos(angle)], axis=-1)[:, None, :], (*shape, 2))
    x = np.concatenate([np.stack([ratio, np.asarray(occupancy, np.float32) / 100,
                                  np.asarray(flow, np.float32) / FLOW_SCALE], axis=-1), clock], axis=-1)
    return np.ascontiguousarray(x.transpose(1, 0, 2), dtype=np.float32)


def latest(readings: Readings | Mapping[str, Any], day: int, t: int) -> np.ndarray:
    """x [E, WINDOW, len(FEATURES)] for every edge of `readings` at interval `t` of `day`:
    what Inference takes to forecast all of them; IndexError if the history is short."""
    found = readings if isinstance(readings, Readings) else Readings.of(readings)
    if not 0 <= day < found.days or not WINDOW - 1 <= t < found.intervals:
        raise IndexError(f"need 0 <= day < {found.days} and {WINDOW - 1} <= t < {found.intervals} "
                         f"(a full window of history), got day {day}, t {t}")
    rows = slice(t - WINDOW + 1, t + 1)
    return window_features(found.speed[day, rows], found.occupancy[day, rows], found.flow[day, rows],
                           found.free_speed, t, found.intervals)


def starts(intervals: int) -> range:
    """The times t (the last interval of an example's window) of each day that examples
    are made at: WINDOW - 1 .. T - 1 - max(HORIZONS)."""
    return range(WINDOW - 1, intervals - max(HORIZONS))


def features(readings: Readings) -> np.ndarray:
    """Every interval's features: float32 [D, T, E, len(FEATURES)]."""
    d, t, e = readings.speed.shape
    angle = 2 * np.pi * np.arange(t) / t
    clock = np.broadcast_to(np.stack([np.sin(angle), np.cos(angle)], axis=-1)[None, :, None, :], (d, t, e, 2))
    measured = np.stack([readings.speed / readings.free_speed, readings.occupancy / 100,
                         readings.flow / FLOW_SCALE], axis=-1)
    return np.concatenate([measured, clock], axis=-1, dtype=np.float32)


@dataclass(frozen=True)
class Windows:
    """Examples `x` (float32 [n, WINDOW, len(FEATURES)]), their targets `y` (float32
    [n, len(HORIZONS)], speed / free_speed at each horizon), each example's speed limit
    `free_speed` (float32 [n], m/s: forecasts in km/h are y * free_speed * 3.6) and the
    readings' `interval` (seconds). Examples are ordered by day, then time, then edge."""

    x: np.ndarray
    y: np.ndarray
    free_speed: np.ndarray
    interval: float = 60.0

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @classmethod
    def of(cls, *all_readings: Readings) -> Windows:
        """The examples of each readings (none crosses from one day, or file, into the
        next); ValueError if their intervals differ or a day is too short for one."""
        if not all_readings:
            raise ValueError("no readings to make windows of")
        intervals = {r.interval for r in all_readings}
        if len(intervals) > 1:
            raise ValueError(f"readings of different intervals {sorted(intervals)} s cannot be mixed: "
                             "the horizons would mean different times")
        parts = [_windows(r) for r in all_readings]
        return cls(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                   np.concatenate([p[2] for p in parts]), all_readings[0].interval)


def _windows(readings: Readings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, t, e = readings.speed.shape
    if t < min_intervals():
        raise ValueError(f"days of {t} intervals are too short: an example needs {min_intervals()} "
                         f"(a window of {WINDOW} and {max(HORIZONS)} ahead)")
    times = starts(t)
    feats = features(readings)  # [D, T, E, F]
    # [D, T - WINDOW + 1, E, F, WINDOW]: the window ending at each t, for the t that have targets
    view = np.lib.stride_tricks.sliding_window_view(feats, WINDOW, axis=1)[:, :len(times)]
    x = np.ascontiguousarray(view.transpose(0, 1, 2, 4, 3)).reshape(-1, WINDOW, len(FEATURES))
    ratio = readings.speed / readings.free_speed
    y = np.stack([ratio[:, times.start + h:times.stop + h] for h in HORIZONS], axis=-1).reshape(-1, len(HORIZONS))
    free_speed = np.broadcast_to(readings.free_speed, (d, len(times), e)).reshape(-1)
    return x.astype(np.float32, copy=False), y.astype(np.float32), free_speed.astype(np.float32)
