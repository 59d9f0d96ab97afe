"""`tandem tasks`: the tasks installed here, as the coordinator and agents load them.

Run it where a coordinator or an agent runs: two installations that print the same
fingerprint for a task train it together; another fingerprint is excluded.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from tandem_cli.options import Subparsers


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("tasks", help="list the tasks installed here (name, version, fingerprint, signatures)")
    p.add_argument("names", nargs="*", metavar="TASK",
                   help="tasks to describe, also PACKAGE.MODULE:ATTRIBUTE (default: every registered one)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_tasks)


def _tasks(args: argparse.Namespace) -> int:
    from tandem import tasks

    rows: list[dict[str, Any]] = []
    failed = 0
    for name in args.names or tasks.names():
        try:
            loaded = tasks.get(name)
        except tasks.UnknownTask:
            if args.names:
                raise
            rows.append({"name": name, "error": "not installed"})
            failed += 1
            continue
        except tasks.TaskError as exc:
            rows.append({"name": name, "error": str(exc)})
            failed += 1
            continue
        task = loaded.task
        rows.append({
            "name": name, "version": loaded.version, "fingerprint": loaded.fingerprint,
            "input": {"shape": list(task.input.shape), "dtype": task.input.dtype},
            "output": {"shape": list(task.output.shape), "dtype": task.output.dtype},
            "federated": len(loaded.specs), "local": len(loaded.local_keys),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            if "error" in row:
                print(f"{row['name']:<24} cannot be loaded: {row['error']}")
                continue
            signature = (f"{'x'.join(map(str, row['input']['shape']))} {row['input']['dtype']} -> "
                         f"{'x'.join(map(str, row['output']['shape']))} {row['output']['dtype']}")
            print(f"{row['name']:<24} v{row['version']:<6} {row['fingerprint']}  {signature:<32} "
                  f"{row['federated']} federated, {row['local']} local tensors")
    return 1 if failed and args.names else 0
