"""Split points found in any model, and the pieces that run between them.

A model is traced with `torch.fx` (`symbolic_trace`). A split point is a node of the
graph after which exactly one value is live: everything later depends on everything
earlier only through that node's output, so the output (an activation) is all that
has to travel between two machines. Points before the first operation and after the
last are trivial and not offered. A task may name its own points
(`Task.split_points`): node names, or module paths (the point after the last node of
that module; the zoo names its `nn.Sequential`'s top-level children so).

Every point is checked once, on one seeded example of the task's input signature
(batch 2): the traced graph must reproduce the model's output, and the two halves at
the point (the activation passed between them as a float32 copy, as over the wire)
must reproduce it too (rtol 1e-5, atol 1e-6); the activation must be one float32
tensor with the batch as its first dimension. A point that fails is dropped, saying
why. A model that cannot be traced (data-dependent control flow, say) or that has no
point left is served whole, as one stage, and the reason is kept (`Plan.note`).

Stage k is the piece between points k-1 and k: a `GraphModule` built once per loaded
version, sharing the model's parameters (`pieces`).
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from tandem.task import Task

log = logging.getLogger(__name__)

RTOL, ATOL = 1e-5, 1e-6
EXAMPLE_ROWS = 2  # two rows, so that a batch dimension is told apart from a size-1 one
_COMPUTE = ("call_module", "call_function", "call_method")
_MAX_NAME_PARTS = 6  # a stage named by its operations lists at most this many


@dataclass(frozen=True)
class Plan:
    """Where a model is split and what its stages look like (for one example)."""

    points: tuple[str, ...]  # fx node names after which it is cut; () serves it whole
    names: tuple[str, ...]  # one per stage
    output_shapes: tuple[tuple[int, ...], ...]  # one per stage, no batch dimension
    note: str = ""  # why the model is served whole; empty when it is split
    dropped: tuple[str, ...] = ()  # points that were asked for or found but failed, and why


def example(task: Task, rows: int = EXAMPLE_ROWS) -> torch.Tensor:
    """A seeded random batch of the task's input signature (zeros for a non-float dtype)."""
    dtype = getattr(torch, task.input.dtype)
    shape = (rows, *task.input.shape)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    return torch.zeros(shape, dtype=dtype)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, safe beside other threads: while it traces, fx patches
    `nn.Module.__call__` and `__getattr__` for the whole process, so a model running
    on another thread (serving, training) would be traced too. Here a call from any
    other thread than the tracing one goes straight through."""

    def __init__(self) -> None:
        super().__init__()
        self._thread = threading.get_ident()

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


_TRACE_LOCK = threading.Lock()  # fx's patches are process-wide: one trace at a time


def trace(model: nn.Module) -> fx.GraphModule:
    """The model's graph (anything torch.fx raises when it cannot trace it)."""
    with _TRACE_LOCK:
        tracer = _Tracer()
        graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def live_points(graph: fx.Graph) -> list[fx.Node]:
    """The nodes after which exactly one value (the node's own output) is live, in order;
    parameters and buffers (get_attr) are reachable from any piece and do not count."""
    nodes = list(graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    last_use = {node: max((index[user] for user in node.users), default=-1) for node in nodes}
    compute = [i for i, node in enumerate(nodes) if node.op in _COMPUTE]
    if not compute:
        return []
    points, live = [], set[fx.Node]()
    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        if node.op != "get_attr":
            live.add(node)
        live = {value for value in live if last_use[value] > i}
        if node.op in _COMPUTE and i < compute[-1] and live == {node}:
            points.append(node)
    return points


def _modules_of(node: fx.Node) -> dict[str, type]:
    """The modules (path -> class) a node lies inside, outermost first, as traced."""
    stack = node.meta.get("nn_module_stack") or {}
    return {str(path): kind for path, (_, kind) in stack.items()}


def resolve(graph: fx.Graph, names: Sequence[str]) -> tuple[list[fx.Node], list[str]]:
    """The nodes that `names` (node names or module paths) name, and what could not be found."""
    nodes = list(graph.nodes)
    by_name = {node.name: node for node in nodes}
    found, missing = [], []
    for name in names:
        node = by_name.get(name)
        if node is None:  # a module path: the last node inside that module
            inside = [n for n in nodes if n.op in _COMPUTE and name in _modules_of(n)]
            node = inside[-1] if inside else None
        if node is None:
            missing.append(f"{name}: no node or module of that name in the traced graph")
        else:
            found.append(node)
    return found, missing


def pieces_of(gm: fx.GraphModule, cuts: Sequence[fx.Node]) -> list[fx.GraphModule]:
    """One GraphModule per stage: the nodes after each cut up to the next (the last up
    to the output). Each takes one tensor; parameters are shared with `gm`'s root."""
    nodes = list(gm.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    ends = [index[cut] for cut in cuts] + [len(nodes) - 1]
    result, begin = [], -1
    for k, end in enumerate(ends):
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if k > 0:
            env[cuts[k - 1]] = graph.placeholder("activation")

        def lookup(node: fx.Node, graph: fx.Graph = graph, env: dict[fx.Node, fx.Node] = env) -> fx.Node:
            if node not in env:
                if node.op != "get_attr":  # cannot happen at a point where one value is live
                    raise ValueError(f"{node.name} is needed across a split point")
                env[node] = graph.node_copy(node)
            return env[node]

        for node in nodes[begin + 1:end + 1]:
            if node.op == "get_attr" or (node.op == "placeholder" and k > 0):
                continue
            if node.op == "output":
                graph.output(fx.map_arg(node.args[0], lookup))
            else:
                env[node] = graph.node_copy(node, lookup)
        if k < len(cuts):
            graph.output(env[cuts[k]])
        result.append(fx.GraphModule(gm, graph, class_name=f"Stage{k + 1}"))
        begin = end
    return result


def _close(actual: object, expected: torch.Tensor) -> bool:
    return (isinstance(actual, torch.Tensor) and actual.shape == expected.shape
            and bool(torch.allclose(actual.float(), expected.float(), rtol=RTOL, atol=ATOL)))


def _over_the_wire(h: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.array(h.detach().cpu().numpy(), dtype=np.float32, order="C"))


def _check_point(gm: fx.GraphModule, node: fx.Node, x: torch.Tensor, expected: torch.Tensor) -> str:
    """Why the point after `node` cannot be used (empty: it can)."""
    meta = node.meta.get("tensor_meta")
    if not isinstance(meta, TensorMetadata):
        return f"{node.name}: its output is not one tensor"
    if meta.dtype != torch.float32:
        return f"{node.name}: its output is {str(meta.dtype).removeprefix('torch.')}, not float32"
    if len(meta.shape) < 1 or meta.shape[0] != x.shape[0]:
        return f"{node.name}: its output {list(meta.shape)} does not keep the batch as its first dimension"
    head, tail = pieces_of(gm, [node])
    if not _close(tail(_over_the_wire(head(x))), expected):
        return f"{node.name}: the two halves do not reproduce the model's output"
    return ""


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return str(node.target)
    return str(getattr(node.target, "__name__", node.target))


def stage_name(gm: fx.GraphModule, nodes: Sequence[fx.Node], all_nodes: Sequence[fx.Node]) -> str:
    """A module's class when the stage is exactly one module (not a container); else its
    operations joined by '+' (a Sequential of Linear and ReLU: 'Linear+ReLU')."""
    compute = [n for n in nodes if n.op in _COMPUTE]
    outer = {next(iter(_modules_of(n).items()), ("", nn.Module)) for n in compute}
    if len(outer) == 1 and (only := outer.pop())[0]:
        path, kind = only
        outside = [n for n in all_nodes if n.op in _COMPUTE and n not in compute and path in _modules_of(n)]
        if not outside and not issubclass(kind, nn.Sequential | nn.ModuleList | nn.ModuleDict):
            return kind.__name__
    parts = [_op_name(gm, n) for n in compute if n.target is not operator.getitem]
    if len(parts) > _MAX_NAME_PARTS:
        parts = [*parts[:3], f"...({len(parts) - 5} more)", *parts[-2:]]
    return "+".join(parts) or "identity"


def _whole(model: nn.Module, expected: torch.Tensor, note: str, dropped: Sequence[str] = ()) -> Plan:
    return Plan((), (type(model).__name__,), (tuple(expected.shape[1:]),), note, tuple(dropped))


def find(task: Task, model: nn.Module) -> Plan:
    """The model's split points (the task's, or every one tracing finds), checked; the
    model is put in eval mode. Call off the event loop: it runs the model a few times."""
    model.eval()
    x = example(task)
    with torch.inference_mode():
        expected = model(x)
    if not isinstance(expected, torch.Tensor):
        raise ValueError(f"{type(model).__name__}'s output is {type(expected).__name__}, not one tensor")
    try:
        gm = trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises TraceError, TypeError, NotImplementedError, ...
        first = (str(exc).strip().splitlines() or [""])[0]
        return _whole(model, expected, f"torch.fx cannot trace it ({type(exc).__name__}: {first})")
    with torch.inference_mode():
        ShapeProp(gm).propagate(x)
        if not _close(gm(x), expected):
            return _whole(model, expected, "its traced graph does not reproduce its output")
    candidates = live_points(gm.graph)
    asked = task.split_points(model)
    dropped: list[str] = []
    if asked is None:
        cuts = candidates
    else:
        named, dropped = resolve(gm.graph, asked)
        cuts = []
        for node in named:
            if node not in candidates:
                dropped.append(f"{node.name}: more than one value is live after it")
            elif cuts and list(gm.graph.nodes).index(node) <= list(gm.graph.nodes).index(cuts[-1]):
                dropped.append(f"{node.name}: not after the point before it")
            else:
                cuts.append(node)
    kept = []
    with torch.inference_mode():
        for node in cuts:
            reason = _check_point(gm, node, x, expected)
            if reason:
                dropped.append(reason)
            else:
                kept.append(node)
        stages = pieces_of(gm, kept)
        h = x
        for piece in stages:
            h = piece(h)
        if kept and not _close(h, expected):
            return _whole(model, expected, "its pieces run in turn do not reproduce its output", dropped)
    for reason in dropped:
        log.warning("%s: split point dropped: %s", task.name or type(task).__name__, reason)
    if not kept:
        why = "no point in its traced graph has exactly one live value after it"
        if dropped:
            why = f"every split point failed its check ({'; '.join(dropped)})"
        elif asked is not None and not asked:
            why = "its task names no split points"
        return _whole(model, expected, why, dropped)
    nodes = list(gm.graph.nodes)
    bounds = [-1, *(nodes.index(node) for node in kept), len(nodes) - 1]
    names = tuple(stage_name(gm, nodes[a + 1:b + 1], nodes) for a, b in zip(bounds, bounds[1:], strict=False))
    shapes = tuple(tuple(int(d) for d in node.meta["tensor_meta"].shape[1:]) for node in kept)
    return Plan(tuple(node.name for node in kept), names, (*shapes, tuple(expected.shape[1:])), "", tuple(dropped))


def pieces(model: nn.Module, plan: Plan) -> list[nn.Module]:
    """The model's stages as runnable modules, at the plan's points (the model itself
    when it is served whole). They share the model's parameters: move it first."""
    if not plan.points:
        return [model]
    gm = trace(model)
    nodes, missing = resolve(gm.graph, plan.points)
    if missing:
        raise ValueError(f"the model traces differently than when its points were found: {missing}")
    return list(pieces_of(gm, nodes))
