"""The reference workload on Flower, to measure Tandem's federated rounds against a peer.

Runs under a separate interpreter that has `flwr==1.42.0` and `torch==2.13.0` (Flower's
dependencies do not install beside Tandem's: it pins protobuf 6, Tandem's generated code
needs 7), so this module imports neither Tandem nor anything Tandem generated: only
numpy, torch and flwr. `tandem_lab.bench_flower` writes the data and starts it.

    PY -m tandem_lab.flower_peer server --address 127.0.0.1:PORT --clients 8 --rounds 20 \
        --data DIR --certs DIR --out result.json
    PY -m tandem_lab.flower_peer client --address localhost:PORT --data DIR/client-I.npz --index I --certs DIR

What runs is docs/design.md's reference workload as Tandem runs it: the MLP 64-512-512-10
seeded 0 (layers created in the same order as the zoo's `mlp`), 5 local epochs of SGD
lr 0.1, batch 32, the shuffle seeded `round * 1000 + index`; dense float32 FedAvg weighted
by example count; the test accuracy measured on the server after every round (Flower's
`evaluate_fn`), as Tandem's coordinator does; Flower's `start_server`/`start_client` over
TLS with the deployment's CA and the cloud's certificate. A round's seconds are the time
between two successive server evaluations (round 1's from when every client had
connected: a Tandem job starts once its agents are), so each includes its training,
transfers, aggregation and evaluation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torch's own idiom


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def get_weights(model: nn.Module) -> list[np.ndarray]:
    return [t.detach().cpu().numpy().astype(np.float32, copy=True) for t in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    state = model.state_dict()
    with torch.no_grad():
        for tensor, value in zip(state.values(), weights, strict=True):
            tensor.copy_(torch.from_numpy(np.asarray(value)))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float, seed: int) -> float:
    """tandem.training.train_local without FedProx: the same batches in the same order."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    model.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch):
            idx = order[start:start + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            torch.autograd.backward(loss)
            optimizer.step()
            total += float(loss.detach())
            batches += 1
    return total / batches


def _arrays(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as data:
        return torch.tensor(data["x"], dtype=torch.float32), torch.tensor(data["y"], dtype=torch.int64)


def run_server(args: argparse.Namespace) -> None:
    import flwr  # only in the peer's own interpreter
    from flwr.server import SimpleClientManager
    from flwr.server.strategy import FedAvg

    x_test, y_test = _arrays(args.data / "test.npz")
    model = build()
    marks: list[float] = []
    accuracy: list[float] = []

    def evaluate(server_round: int, weights: list[np.ndarray], config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        set_weights(model, weights)
        model.eval()
        with torch.inference_mode():
            logits = model(x_test)
            loss = float(F.cross_entropy(logits, y_test))
            acc = float((logits.argmax(dim=1) == y_test).float().mean())
        accuracy.append(acc)
        marks.append(time.perf_counter())
        return loss, {"accuracy": acc}

    ready: list[float] = []  # when every client had connected: round 1 starts then, as a Tandem job does

    class Clients(SimpleClientManager):  # type: ignore[misc]
        def sample(self, *args: Any, **kwargs: Any) -> Any:
            chosen = super().sample(*args, **kwargs)  # waits for min_num_clients
            if not ready:
                ready.append(time.perf_counter())
            return chosen

    strategy = FedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=args.clients, min_evaluate_clients=0,
        min_available_clients=args.clients, evaluate_fn=evaluate,
        on_fit_config_fn=lambda server_round: {"round": server_round},
        initial_parameters=flwr.common.ndarrays_to_parameters(get_weights(build())),
    )
    certs = args.certs
    started = time.perf_counter()
    flwr.server.start_server(
        server_address=args.address, config=flwr.server.ServerConfig(num_rounds=args.rounds), strategy=strategy,
        client_manager=Clients(),
        certificates=((certs / "ca.pem").read_bytes(), (certs / "cloud.pem").read_bytes(),
                      (certs / "cloud.key").read_bytes()),
    )
    if ready:
        marks[0] = max(marks[0], ready[0])
    rounds = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    args.out.write_text(json.dumps({
        "flwr": flwr.__version__, "torch": torch.__version__, "round_seconds": rounds,
        "accuracy": accuracy[1:], "wall_seconds": time.perf_counter() - started,
        "clients_ready_after_seconds": (ready[0] - started) if ready else None,
    }))


def run_client(args: argparse.Namespace) -> None:
    import flwr
    from flwr.client import NumPyClient

    x, y = _arrays(args.data)
    model = build()

    class Client(NumPyClient):  # type: ignore[misc]
        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return get_weights(model)

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, float]]:
            set_weights(model, parameters)
            loss = train(model, x, y, 5, 32, 0.1, int(config["round"]) * 1000 + args.index)
            return get_weights(model), int(x.shape[0]), {"loss": loss}

    flwr.client.start_client(server_address=args.address, client=Client().to_client(),
                             root_certificates=(args.certs / "ca.pem").read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(prog="tandem_lab.flower_peer")
    parser.add_argument("role", choices=("server", "client"))
    parser.add_argument("--address", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--certs", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("flower.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # as Tandem's agents train (`tandem edge --threads 1`)
    (run_server if args.role == "server" else run_client)(args)


if __name__ == "__main__":
    main()
