"""Time series for the forecaster: a synthetic generator, CSV files, and sliding windows.

A CSV file holds one series, oldest row first, with a header naming at least a `value`
column (the example files have `timestamp,value`; other columns are ignored):

    timestamp,value
    2024-01-01T00:00:00,10.41
    2024-01-01T01:00:00,11.07
"""

from __future__ import annotations

import csv
import math
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np


def synthetic(site: int, sites: int, length: int = 720, seed: int = 0) -> np.ndarray:
    """Hourly readings of site `site` of `sites`: a daily and a weekly cycle around a level,
    each site with its own phase, level and noise; deterministic in (site, sites, seed)."""
    if sites < 1 or not 0 <= site < sites:
        raise ValueError(f"need 0 <= site < sites, got site {site} of {sites}")
    rng = np.random.default_rng([seed, sites, site])
    t = np.arange(length, dtype=np.float64)
    phase = 2 * math.pi * site / sites
    noise = 0.1 + 0.3 * site / max(sites - 1, 1)
    values = (10 + site + 3 * np.sin(2 * math.pi * t / 24 + phase) + np.sin(2 * math.pi * t / 168 + phase / 2)
              + noise * rng.standard_normal(length))
    return values.astype(np.float32)


def read_csv(path: Path) -> np.ndarray:
    """The `value` column of the CSV file at `path`; a one-line ValueError naming the file
    and line for anything else (no header, no `value` column, a cell that is not a number)."""
    values: list[float] = []
    try:
        with path.open(newline="", encoding="utf-8") as file:
            reader = csv.reader(file)
            header = [name.strip().lower() for name in next(reader, [])]
            if "value" not in header:
                raise ValueError(f"{path}: the first line must be a header with a 'value' column, got {header}")
            column = header.index("value")
            for row in reader:
                if not row:
                    continue
                try:
                    value = float(row[column])
                except (IndexError, ValueError):
                    raise ValueError(f"{path}, line {reader.line_num}: no number in column 'value': "
                                     f"{','.join(row)[:80]!r}") from None
                if not math.isfinite(value):
                    raise ValueError(f"{path}, line {reader.line_num}: value {value} is not finite")
                values.append(value)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot read as CSV: {exc}") from None
    return np.asarray(values, dtype=np.float32)


def write_csv(path: Path, values: np.ndarray, start: datetime = datetime(2024, 1, 1)) -> None:
    """Write `values` as hourly `timestamp,value` rows from `start`."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["timestamp", "value"])
        for hour, value in enumerate(values):
            writer.writerow([(start + timedelta(hours=hour)).isoformat(), f"{float(value):.4f}"])


def windows(series: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Every `window` consecutive values (x: [n, window, 1]) with the value after them
    (y: [n, 1]); ValueError if the series is too short for one."""
    if len(series) <= window:
        raise ValueError(f"a series of {len(series)} values is too short: windows need at least {window + 1}")
    x = np.lib.stride_tricks.sliding_window_view(series[:-1], window)
    return np.ascontiguousarray(x[..., None], dtype=np.float32), series[window:, None].astype(np.float32)
