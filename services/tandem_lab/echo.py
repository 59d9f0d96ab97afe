"""The gRPC ceiling of `python -m tandem_lab bench infer`: the Inference API served over the
deployment's mutual TLS by a backend that does no work, answering each request with
its own input tensor.

Run it as its own process: `python -m tandem_lab.echo --certs DIR --ready-file F`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from tandem import grpcserver, lifecycle, tls
from tandem.inference import InferenceService
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc


class EchoBackend:
    """A `tandem.inference.Backend` whose output is the request's input."""

    async def infer(self, request: pb.InferRequest, deadline: float | None) -> pb.InferResponse:
        return pb.InferResponse(
            request_id=request.request_id, model=request.model, version=1, output=request.input,
            placement=pb.PLACEMENT_CLOUD,
        )

    async def model_info(self, request: pb.ModelInfoRequest) -> pb.ModelInfo:
        return pb.ModelInfo(model=request.model, version=1, device="none")


async def serve(certs_dir: Path, listen: str, ready_file: Path | None) -> int:
    server = grpcserver.create_server()
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceService(EchoBackend()), server)
    port = server.add_secure_port(listen, tls.server_credentials(certs_dir))
    stop = lifecycle.stop_event()
    await server.start()
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
        tmp.replace(ready_file)
    await stop.wait()
    await server.stop(1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem_lab.echo", description=__doc__)
    parser.add_argument("--certs", type=Path, required=True, help="deployment certificates (serves cloud.pem)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default %(default)s)")
    parser.add_argument("--ready-file", type=Path, default=None, help="write the bound port here as JSON")
    args = parser.parse_args(argv)
    return asyncio.run(serve(args.certs, args.listen, args.ready_file))


if __name__ == "__main__":
    sys.exit(main())
