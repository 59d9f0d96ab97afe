"""`tandem infer MODEL`: call the Inference API from the shell, against the coordinator
(--cloud) or any Inference server (--server: an edge agent's --listen, a `tandem serve`
replica), with rows from a .npy/.npz file or from the task's own load_data.

Both the cloud's and an edge agent's Inference accept any certificate of the
deployment's CA; this command presents the admin certificate unless --as names a
client certificate (`tandem certs add-client NAME`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from tandem import certs, grpcserver, tls, wire
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc
from tandem_cli.options import Subparsers, client_args

DATA_ROWS = 8  # rows of --data sent when --rows is not given

EPILOG = """\
examples:
  tandem infer mlp --data digits --rows 4                 # the task's own data, from the cloud
  tandem infer mlp --input x.npy --json                   # one JSON object per row
  tandem infer mlp --info                                 # the stages, to choose a split point
  tandem infer mlp --input h1.npy --start-layer 1         # h1: the activation after stage 1
  tandem infer mlp --data digits:0/4 --server localhost:7450 --as camera-app   # an edge agent

Both the cloud's and an edge agent's Inference accept any certificate of the
deployment; the admin certificate is used unless --as names a client's."""


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "infer", help="run a model on rows from a file or the task's data, in the cloud or at an edge agent",
        description="Send rows to the Inference API and print each row's output. The rows come from\n"
                    "--input (a .npy array [rows, ...] or a .npz with an array x) or from --data (the\n"
                    "task's load_data(SPEC); the task must be installed here). --info prints the model's\n"
                    "stages instead. A gRPC error is one line with its code (exit 1); a missing or\n"
                    "ill-shaped input, one line (exit 2).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="the model (task) name, e.g. mlp")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--input", type=Path, metavar="FILE",
                        help="rows to send: a .npy array [rows, ...], or a .npz holding an array x "
                             "(float64 is sent as float32)")
    source.add_argument("--data", metavar="SPEC",
                        help="rows to send: the x of the task's load_data(SPEC), e.g. digits or digits:0/4 "
                             "(the task must be installed here)")
    source.add_argument("--info", action="store_true",
                        help="print the model's stages (names, output shapes, timings) and split note instead")
    p.add_argument("--rows", type=int, metavar="N",
                   help=f"send the first N rows (default: {DATA_ROWS} of --data, all of --input)")
    p.add_argument("--version", type=int, default=0, metavar="V", help="model version (default %(default)s: the serving one)")
    p.add_argument("--start-layer", type=int, default=0, metavar="K",
                   help="the input is the activation after stage K, and the server runs the stages after it "
                        "(default %(default)s: the model's input; see --info)")
    p.add_argument("--deadline-ms", type=int, default=0, metavar="MS",
                   help="latency budget per request, in milliseconds (default %(default)s: none)")
    p.add_argument("--batch", type=int, default=64, metavar="N", help="rows per request (default %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="seconds each call may take (default %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per row: its output values and, for more than one value, the argmax "
                        "and its softmax probability")
    p.add_argument("--server", metavar="HOST:PORT", default="",
                   help="an Inference server to call instead of --cloud: an edge agent's --listen or a "
                        "`tandem serve` replica")
    client_args(p)
    p.add_argument("--as", dest="client", metavar="CLIENT", default="",
                   help="present the client certificate CLIENT (made by `tandem certs add-client`) instead of "
                        "the admin's; the cloud and edge agents accept either")
    p.set_defaults(func=_infer)


def _infer(args: argparse.Namespace) -> int:
    if args.rows is not None and args.rows < 1:
        raise ValueError(f"--rows must be at least 1, got {args.rows}")
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    if args.start_layer < 0:
        raise ValueError(f"--start-layer must be >= 0, got {args.start_layer}")
    if args.info:
        return asyncio.run(_with_stub(args, _info))
    if args.input is None and args.data is None:
        raise ValueError("give the rows to send with --input FILE or --data SPEC (or ask for --info)")
    if args.data is not None and args.start_layer:
        raise ValueError("--start-layer needs --input holding the activation after that stage; "
                         "--data gives the model's input")
    x = read_input(args.input, args.rows) if args.input is not None else task_rows(args.model, args.data, args.rows)
    return asyncio.run(_with_stub(args, lambda a, stub: _run(a, stub, x)))


def read_input(path: Path, rows: int | None) -> np.ndarray:
    """The rows of a .npy file or of array `x` in a .npz; ValueError saying what is wrong."""
    if not path.is_file():
        raise ValueError(f"input file {path} not found")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"input file {path} is not a .npy or .npz file: {exc}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if "x" not in loaded.files:
                raise ValueError(f"input file {path} has no array x (it has {', '.join(loaded.files) or 'none'})")
            x = loaded["x"]
    else:
        x = loaded
    return _batch(x, f"input file {path}", rows)


def task_rows(model: str, spec: str, rows: int | None) -> np.ndarray:
    """The first rows of x from the installed task's load_data(spec), in its input dtype."""
    from tandem import tasks  # torch and the task: loaded for --data alone

    task = tasks.get(model).task
    data = task.load_data(spec)
    x = data.get("x") if isinstance(data, dict) else getattr(data, "x", None)
    if x is None:
        raise ValueError(f"{model}'s load_data({spec!r}) gives no array x to send")
    return _batch(np.asarray(x)[: rows or DATA_ROWS], f"{model}'s load_data({spec!r})", None).astype(
        task.input.dtype, copy=False)


def _batch(x: np.ndarray, what: str, rows: int | None) -> np.ndarray:
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{what} holds shape {list(x.shape)}; rows to send are [rows, ...] with at least one row")
    if x.dtype == np.float64:
        x = x.astype(np.float32)
    try:
        wire.dtype_to_proto(x.dtype)
    except wire.WireError:
        raise ValueError(f"{what} holds {x.dtype}, which has no wire encoding") from None
    return np.ascontiguousarray(x[:rows] if rows else x)


async def _with_stub(args: argparse.Namespace, call: Any) -> int:
    certs_dir: Path = args.certs
    if args.client:
        missing = [p for p in certs.client_paths(certs_dir, args.client) if not p.is_file()]
        if missing:
            raise ValueError(f"no client certificate {args.client!r} in {certs_dir} ({missing[0]} not found; "
                             f"`tandem certs add-client {args.client} --dir {certs_dir}` makes one)")
        credentials = tls.app_credentials(certs_dir, args.client)
    else:
        credentials = tls.admin_credentials(certs_dir)
    async with grpcserver.secure_channel(args.server or args.cloud, credentials) as channel:
        result: int = await call(args, inference_pb2_grpc.InferenceStub(channel))
        return result


async def _info(args: argparse.Namespace, stub: inference_pb2_grpc.InferenceStub) -> int:
    info = await stub.GetModelInfo(pb.ModelInfoRequest(model=args.model, version=args.version),
                                   timeout=args.timeout)
    row = info_dict(info)
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    print(f"{row['model']} v{row['version']}  sha256 {row['sha256'][:16]}  on {row['device'] or '?'}  "
          f"input {_shape(row['input_shape'])}")
    print(f"{'stage':>5}  {'name':<24} {'output':<16} {'bytes':>9}  {'us/example':>10}")
    for s in row["stages"]:
        print(f"{s['index']:>5}  {s['name']:<24} {_shape(s['output_shape']):<16} {s['output_bytes']:>9}  "
              f"{s['seconds_per_example'] * 1e6:>10.1f}")
    if row["split_note"]:
        print(f"served whole: {row['split_note']}")
    elif len(row["stages"]) > 1:
        print(f"split after stage K (1..{len(row['stages']) - 1}): send its output with --start-layer K")
    return 0


def info_dict(info: pb.ModelInfo) -> dict[str, Any]:
    return {
        "model": info.model, "version": info.version, "sha256": info.sha256, "device": info.device,
        "input_shape": list(info.input_shape), "split_note": info.split_note,
        "stages": [{"index": s.index, "name": s.name, "output_shape": list(s.output_shape),
                    "output_bytes": s.output_bytes, "seconds_per_example": s.seconds_per_example}
                   for s in info.stages],
    }


def _shape(dims: list[int]) -> str:
    return "x".join(map(str, dims)) or "scalar"


async def _run(args: argparse.Namespace, stub: inference_pb2_grpc.InferenceStub, x: np.ndarray) -> int:
    row = 0
    for start in range(0, x.shape[0], args.batch):
        chunk = x[start:start + args.batch]
        response: pb.InferResponse = await stub.Infer(
            pb.InferRequest(request_id=f"cli-{start}", model=args.model, version=args.version,
                            input=wire.to_proto(chunk), start_layer=args.start_layer, deadline_ms=args.deadline_ms),
            timeout=args.timeout,
        )
        placement = pb.Placement.Name(response.placement).removeprefix("PLACEMENT_").lower()
        for values in wire.from_proto(response.output, max_bytes=grpcserver.MAX_MESSAGE_BYTES):
            print(row_line(row, values, response.version, placement, args.json), flush=True)
            row += 1
    return 0


def row_view(values: np.ndarray) -> dict[str, Any]:
    """A row's output values and, for more than one, the argmax and its softmax probability."""
    out: dict[str, Any] = {"output": values.tolist()}
    flat = values.reshape(-1).astype(np.float64)
    if flat.size > 1:
        top = int(np.argmax(flat))
        shifted = np.exp(flat - flat[top])
        out["argmax"] = top
        total = float(shifted.sum())
        out["probability"] = 1.0 / total if math.isfinite(total) and total > 0 else float("nan")
    return out


def row_line(row: int, values: np.ndarray, version: int, placement: str, as_json: bool) -> str:
    view = row_view(values)
    if as_json:
        return json.dumps({"row": row, **view, "version": version, "placement": placement})
    if "argmax" in view:
        return f"{row:>5}  argmax {view['argmax']:<4} p {view['probability']:.4f}  v{version} {placement}"
    return f"{row:>5}  {' '.join(f'{v:.6g}' for v in values.reshape(-1))}  v{version} {placement}"

