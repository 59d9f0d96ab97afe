"""The edge agent's inference backend: run each request here, in the cloud, split
between the two, or as a cascade, as the model's placement says, and answer
locally whenever the cloud cannot answer in time. No request fails because the link
did: the agent holds every model it serves, so it can always finish the work itself.
Each answer is counted against the version that gave it (edge.signals), and a canary's
full local answers are compared with the previous version's (edge.shadow).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import grpc
import numpy as np

from edge.link import LinkMonitor
from edge.models import EdgeModels
from edge.shadow import Shadow, top_probability
from edge.signals import Signals
from tandem import metrics, wire
from tandem.batching import Batcher
from tandem.errors import InvalidArgument, ResourceExhausted, TandemError, Unavailable
from tandem.inference import decode_input, model_info
from tandem.measurements import LINK_UP, ConfidenceBelow, ExamplesPerSecond, StageSeconds
from tandem.placement import EDGE, Placement
from tandem.staged import StagedModel
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc


@dataclass(frozen=True)
class RouterConfig:
    max_request_rows: int = 1024
    cloud_timeout: float = 1.0  # for requests without a deadline
    margin: float = 0.003  # seconds kept back from a deadline for answering locally


# Confidence levels at which the agent reports how many answers fell below: what a
# cascade at that threshold would send up (the controller prices cascades with it).
CONFIDENCE_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def _finite(out: np.ndarray) -> bool:
    # A float64 sum of float32 values cannot overflow: finite exactly when every value is.
    with np.errstate(invalid="ignore"):
        return bool(np.isfinite(out.sum(dtype=np.float64)))


class EdgeRouter:
    """Implements `tandem.inference.Backend` for an edge agent."""

    def __init__(
        self, models: EdgeModels, link: LinkMonitor, batcher: Batcher, placements: dict[str, Placement],
        config: RouterConfig,
    ) -> None:
        self.models, self.link, self.batcher, self.config = models, link, batcher, config
        self._placements = dict(placements)
        self.cloud: inference_pb2_grpc.InferenceStub | None = None  # set once the channel exists
        self._examples: dict[str, int] = {}  # model -> rows served, for the request rate
        self._rates: dict[str, tuple[float, int]] = {}  # model -> (when, rows) at the last report
        self._confidence: dict[str, np.ndarray] = {}  # model -> [answers, below each grid level]
        self.signals = Signals(models.served)  # drained into each heartbeat
        self.shadow = Shadow(batcher, self.signals)

    def placement(self, model: str) -> Placement:
        return self._placements.get(model, EDGE)

    def set_placement(self, model: str, placement: Placement, num_stages: int) -> None:
        self._placements[model] = placement
        metrics.EDGE_PLACEMENT.labels(model).set(placement.gauge(num_stages))

    async def model_info(self, request: pb.ModelInfoRequest) -> pb.ModelInfo:
        if not request.model:
            raise InvalidArgument("model name is required")
        return model_info(await self.models.get(request.model, request.version))

    def measurements(self) -> dict[str, float]:
        """What the placement controller needs from this agent, for its heartbeat: each
        served model's per-stage seconds per example and examples per second, and the link."""
        now = time.monotonic()
        values: dict[str, float] = {LINK_UP: 1.0 if self.link.available() else 0.0}
        for model in self.models.served():
            for index, seconds in enumerate(model.seconds_per_example(), start=1):
                values[StageSeconds(model.model, index).key] = seconds
            rows = self._examples.get(model.model, 0)
            then, before = self._rates.get(model.model, (now, rows))
            if now > then:
                values[ExamplesPerSecond(model.model).key] = (rows - before) / (now - then)
            self._rates[model.model] = (now, rows)
            counts = self._confidence.pop(model.model, None)
            if counts is not None and counts[0] > 0:
                for level, below in zip(CONFIDENCE_GRID, counts[1:]):
                    values[ConfidenceBelow(model.model, level).key] = float(below / counts[0])
                    metrics.EDGE_CONFIDENCE_BELOW.labels(model.model, f"{level:g}").set(float(below / counts[0]))
        return values

    def _count_confidence(self, model: str, confidence: np.ndarray) -> None:
        counts = self._confidence.setdefault(model, np.zeros(len(CONFIDENCE_GRID) + 1))
        counts[0] += len(confidence)
        counts[1:] += (confidence[:, None] < np.asarray(CONFIDENCE_GRID)[None, :]).sum(axis=0)

    def close(self) -> None:
        """Stop the canary comparisons in flight."""
        self.shadow.close()

    async def infer(self, request: pb.InferRequest, deadline: float | None) -> pb.InferResponse:
        begin = time.perf_counter()
        x = decode_input(request, self.config.max_request_rows)
        if request.version and request.version != self.models.held_version(request.model):
            return await self._not_held(request, x, deadline)
        model = await self.models.get(request.model, request.version)
        model.check_input(x, request.start_layer)  # a bad input is the caller's doing: not counted
        try:
            response, out = await self._route(request, model, x, deadline)
        except ResourceExhausted:
            raise  # refused for load before any version ran it: not the version's doing either
        except Exception:
            self.signals.answered(model.model, model.version, time.perf_counter() - begin, failed=True)
            raise
        self.signals.answered(model.model, model.version, time.perf_counter() - begin, failed=not _finite(out))
        return response

    async def _not_held(self, request: pb.InferRequest, x: np.ndarray, deadline: float | None) -> pb.InferResponse:
        """A version named explicitly that this agent does not serve (a candidate, or one
        retired): the cloud holds every version, so it answers, with its own status when
        it cannot (NOT_FOUND for a version that does not exist)."""
        held = await self.models.get(request.model, 0)  # the shapes to expect, and a check of the input
        held.check_input(x, request.start_layer)
        if self.cloud is None or not self.link.available():
            raise Unavailable(f"this agent serves {held.model} v{held.version}; v{request.version} is answered by "
                              "the cloud, which cannot be reached now")
        timeout = self.config.cloud_timeout if deadline is None else max(deadline - time.monotonic(), 0.001)
        forwarded = pb.InferRequest(request_id=request.request_id, model=held.model, version=request.version,
                                    input=wire.to_proto(x), start_layer=request.start_layer,
                                    deadline_ms=max(1, int(timeout * 1000)))
        try:
            answer: pb.InferResponse = await self.cloud.Infer(forwarded, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            error = TandemError(f"the cloud, asked for {held.model} v{request.version} (this agent serves "
                                f"v{held.version}): {exc.details()}")
            error.code = exc.code()
            raise error from None
        return pb.InferResponse(request_id=request.request_id, model=held.model, version=answer.version,
                                output=answer.output, placement=pb.PLACEMENT_CLOUD)

    async def _route(
        self, request: pb.InferRequest, model: StagedModel, x: np.ndarray, deadline: float | None
    ) -> tuple[pb.InferResponse, np.ndarray]:
        """The answer, and its output as an array."""
        self._examples[model.model] = self._examples.get(model.model, 0) + len(x)
        metrics.EDGE_EXAMPLES.labels(model.model).inc(len(x))
        placement = self.placement(request.model)
        start, last = request.start_layer, model.num_stages
        if placement.mode == "cascade" and start == 0:
            return await self._cascade(request, model, x, placement, deadline)
        here = max(start, placement.edge_stages(last))
        h = await self._local(model, x, start, here) if here > start else x
        if here < last:
            # Split: the cloud must run the same version; all-cloud takes whatever was asked for.
            version = model.version if here > 0 else request.version
            estimate = sum(model.seconds_per_example()[here:]) * len(x)
            expected = (len(x), *model.stages[-1].output_shape)
            answer = await self._cloud(request.request_id, model.model, version, h, here, deadline, estimate, expected)
            if answer is not None:
                return pb.InferResponse(
                    request_id=request.request_id, model=model.model, version=answer[0],
                    output=wire.to_proto(answer[1]), placement=pb.PLACEMENT_SPLIT if here > 0 else pb.PLACEMENT_CLOUD,
                ), answer[1]
            h = await self._local(model, h, here, last)
        if h.ndim == 2:  # class scores: how sure the edge is tells what a cascade would send up
            self._count_confidence(model.model, top_probability(h))
        if start == 0:
            self._compare_later(model, x, h)
        return self._answer(request, model, h, pb.PLACEMENT_EDGE), h

    async def _cascade(
        self, request: pb.InferRequest, model: StagedModel, x: np.ndarray, placement: Placement, deadline: float | None
    ) -> tuple[pb.InferResponse, np.ndarray]:
        if placement.threshold > 1:  # everything goes up: nothing to compute here first
            answer = await self._cloud(request.request_id, model.model, 0, x, 0, deadline,
                                       sum(model.seconds_per_example()) * len(x),
                                       (len(x), *model.stages[-1].output_shape), cloud_model=placement.cloud_model)
            if answer is not None:
                metrics.EDGE_CASCADE_ROWS.labels(model.model, "cloud").inc(len(x))
                return self._answer(request, model, answer[1], pb.PLACEMENT_CASCADE), answer[1]
        logits = await self._local(model, x, 0, model.num_stages)
        self._compare_later(model, x, logits)  # the edge's own answer, before any row is replaced
        confidence = top_probability(logits)
        self._count_confidence(model.model, confidence)
        unsure = np.flatnonzero(confidence < placement.threshold)
        if placement.threshold > 1:
            unsure = unsure[:0]  # the cloud just failed: answer it all here
        sent_up = False
        if unsure.size:
            cloud_model = placement.cloud_model or model.model
            version = 0 if placement.cloud_model else model.version
            answer = await self._cloud(request.request_id, model.model, version, x[unsure], 0, deadline, 0.0,
                                       (len(unsure), logits.shape[1]), cloud_model=cloud_model)
            if answer is not None:
                logits = logits.copy()
                logits[unsure] = answer[1]
                sent_up = True
        up = int(unsure.size) if sent_up else 0
        metrics.EDGE_CASCADE_ROWS.labels(model.model, "cloud").inc(up)
        metrics.EDGE_CASCADE_ROWS.labels(model.model, "edge").inc(len(x) - up)
        return self._answer(request, model, logits, pb.PLACEMENT_CASCADE if sent_up else pb.PLACEMENT_EDGE), logits

    def _answer(
        self, request: pb.InferRequest, model: StagedModel, out: np.ndarray, where: pb.Placement
    ) -> pb.InferResponse:
        return pb.InferResponse(request_id=request.request_id, model=model.model, version=model.version,
                                output=wire.to_proto(out), placement=where)

    def _compare_later(self, model: StagedModel, x: np.ndarray, out: np.ndarray) -> None:
        """`out` is `model`'s full local answer to `x`: if `model` is a canary, have the
        version it replaced answer `x` too, after this request, and compare (edge.shadow)."""
        previous = self.models.previous(model.model)
        if previous is not None and self.models.held_version(model.model) == model.version:
            self.shadow.compare(model, previous, x, out)

    async def _local(self, model: StagedModel, x: np.ndarray, start: int, end: int) -> np.ndarray:
        run = functools.partial(model.run, start_layer=start, end_layer=end)
        return await self.batcher.submit((model.model, model.version, start, end), x, run, model.model)

    async def _cloud(
        self, request_id: str, model: str, version: int, h: np.ndarray, start_layer: int, deadline: float | None,
        local_estimate: float, expected: tuple[int, ...], cloud_model: str = "",
    ) -> tuple[int, np.ndarray] | None:
        """The cloud's (version, output), or None (counted as a fallback) when it cannot give
        one in time, or gives one that is not of the `expected` shape."""
        if self.cloud is None or not self.link.available():
            metrics.EDGE_FALLBACKS.labels(model, "link_down").inc()
            return None
        if deadline is None:
            timeout = self.config.cloud_timeout
        else:
            timeout = deadline - time.monotonic() - local_estimate - self.config.margin
            if timeout <= 0:
                metrics.EDGE_FALLBACKS.labels(model, "deadline").inc()
                return None
        request = pb.InferRequest(request_id=request_id, model=cloud_model or model, version=version,
                                  input=wire.to_proto(h), start_layer=start_layer,
                                  deadline_ms=max(1, int(timeout * 1000)))
        begin = time.perf_counter()
        try:
            answer: pb.InferResponse = await self.cloud.Infer(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self.link.too_slow(request.ByteSize(), timeout)
            self.link.failure(exc.code())
            metrics.EDGE_FALLBACKS.labels(model, exc.code().name.lower()).inc()
            return None
        # The server's own time is not the link's.
        self.link.success(max(time.perf_counter() - begin - answer.server_seconds, 0.0), request.ByteSize(),
                          answer.ByteSize())
        try:
            out = wire.from_proto(answer.output)
        except wire.WireError:
            out = None
        if out is None or out.shape != expected or out.dtype != np.float32:
            metrics.EDGE_FALLBACKS.labels(model, "bad_response").inc()
            return None
        return answer.version, out
