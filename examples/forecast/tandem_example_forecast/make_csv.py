"""Write example CSV files, one per site: `python -m tandem_example_forecast.make_csv DIR --sites 3`.

Each site gets DIR/site-I/readings.csv (hourly `timestamp,value` rows of the synthetic
series), so an agent can be started with `--data DIR/site-I`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tandem_example_forecast import series


def make_csv(directory: Path, sites: int, length: int = 720, seed: int = 0) -> list[Path]:
    """Write `sites` CSV files under `directory`; return their paths."""
    written = []
    for site in range(sites):
        folder = directory / f"site-{site}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "readings.csv"
        series.write_csv(path, series.synthetic(site, sites, length, seed))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tandem_example_forecast.make_csv", description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--sites", type=int, default=3, help="how many sites (default 3)")
    parser.add_argument("--length", type=int, default=720, help="readings per site (default 720: 30 days hourly)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.sites < 1 or args.length < 25:
        parser.error("need --sites >= 1 and --length >= 25")
    for path in make_csv(args.directory, args.sites, args.length, args.seed):
        print(path)


if __name__ == "__main__":
    main()
