"""Every Prometheus metric Tandem exports, defined once, and the gRPC interceptor.

Names follow `tandem_<subsystem>_<name>_<unit>`, counters end in `_total`, and
units are base units (seconds, bytes).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from tandem.interceptors import Wrapped, guarded

# ---- every server: gRPC -----------------------------------------------------

RPC_HANDLED = Counter(
    "tandem_rpc_server_handled_total", "RPCs completed on the server, by method and status code.",
    ["service", "method", "code"],
)
RPC_SECONDS = Histogram(
    "tandem_rpc_server_handling_seconds", "Time from the start to the end of an RPC on the server.",
    ["service", "method"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600, 3600),
)
RPC_CLIENT_HANDLED = Counter(
    "tandem_rpc_client_handled_total", "RPCs completed by a client, by method and status code.",
    ["method", "code"],
)

# ---- connections (issue 14: connections and stream rates) ----------------------

HANDSHAKE_FAILURES = Counter(
    "tandem_rpc_server_handshake_failures_total",
    "TLS handshakes that failed (no or a bad client certificate, not TLS at all), as gRPC's core logs them.",
)
MAX_CONNECTIONS = Gauge(
    "tandem_rpc_server_max_connections", "Connections a server accepts at once; more are closed at accept."
)

# ---- enrollment (`tandem ca`) -------------------------------------------------

ENROLLMENTS = Counter(
    "tandem_enrollments_total",
    "Enrollment requests by outcome: issued, or why they were refused (unknown_token, replayed, expired, "
    "wrong_name, bad_request).",
    ["outcome"],
)

# ---- coordinator ------------------------------------------------------------

CONNECTED_AGENTS = Gauge("tandem_coordinator_connected_agents", "Agents with an open control stream.")
AGENT_CONNECTS = Counter("tandem_coordinator_agent_connects_total", "Control streams opened by agents.")
AGENT_CONNECTS_REFUSED = Counter(
    "tandem_coordinator_agent_connects_duplicate_total",
    "Control streams refused because the same agent identity has a live one.",
)
UPDATES_ACCEPTED = Counter("tandem_coordinator_updates_accepted_total", "Model updates accepted.")
UPDATES_CLIPPED = Counter(
    "tandem_coordinator_updates_clipped_total", "Updates whose L2 norm was bounded before aggregation."
)
DP_EPSILON = Gauge(
    "tandem_coordinator_dp_epsilon", "Privacy spent by a DP-FedAvg job so far: epsilon at its delta.", ["job_id"]
)
UPDATES_DUPLICATE = Counter("tandem_coordinator_updates_duplicate_total", "Re-sent updates answered as duplicates.")
UPDATES_REJECTED = Counter(
    "tandem_coordinator_updates_rejected_total", "Model updates rejected, by reason.", ["reason"]
)
ROUNDS = Counter("tandem_coordinator_rounds_total", "Round attempts that ended, by outcome.", ["outcome"])
# Known label values exist from the start, at 0, so rate() and increase() see the first event.
for _outcome in ("closed", "retried"):
    ROUNDS.labels(_outcome)
for _reason in ("conflict", "malformed", "resume", "stale", "too_large", "unknown_job"):
    UPDATES_REJECTED.labels(_reason)
TASK_FAILURES = Counter(
    "tandem_coordinator_task_failures_total", "Training tasks agents reported failed (TaskFailed), by reason.",
    ["reason"],
)
for _reason in ("DATA_MISMATCH", "TASK_UNKNOWN", "OUT_OF_MEMORY", "EXCEPTION"):
    TASK_FAILURES.labels(_reason)
ROUND_SECONDS = Histogram(
    "tandem_coordinator_round_duration_seconds", "Wall time of a closed round, from opening to publishing.",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
)
MODEL_VERSION = Gauge("tandem_model_version", "Newest model version published (cloud) or held (edge).", ["model"])
SERVING_VERSION = Gauge(
    "tandem_model_serving_version",
    "The version served when a request names none (0: none promoted yet); at the edge, the serving version held.",
    ["model"],
)
MODEL_PROMOTIONS = Counter(
    "tandem_model_promotions_total", "Changes of a model's serving version, by kind (promote, rollback).",
    ["model", "kind"],
)
ROLLOUTS = Counter(
    "tandem_rollouts_total",
    "Staged rollouts that ended, by outcome (promoted, rolled-back: the canary regressed, aborted: by an operator).",
    ["model", "outcome"],
)
CANARY_VERSION = Gauge(
    "tandem_rollout_canary_version", "The version a staged rollout is testing on a canary share of agents (0: none).",
    ["model"],
)
# Labelled `job_id`: Prometheus' own `job` label (the scrape job) would shadow `job`.
ROUND_ACCURACY = Gauge(
    "tandem_coordinator_round_accuracy_ratio", "Test accuracy after the last closed round.", ["job_id"]
)
# Each closed round's metrics, by task: `source` is train (the agents' TrainResult metrics,
# weighted by examples) or eval (the cloud's evaluate). Names are checked and at most 16
# per task and source are exported (cloud.evaluation), so the series stay few.
ROUND_METRIC = Gauge(
    "tandem_coordinator_round_metric", "A metric of the last closed round of a task.", ["task", "source", "metric"]
)
BYTES_RECEIVED = Counter(
    "tandem_coordinator_received_bytes_total", "Tensor bytes received by the coordinator, by kind.", ["kind"]
)
AUTO_CODEC_BYTES_PER_PARAM = Gauge(
    "tandem_coordinator_auto_codec_bytes_per_param",
    "Expected upload bytes per model parameter of the codec chosen for an agent (codec auto).", ["agent"],
)
BYTES_SENT = Counter("tandem_coordinator_sent_bytes_total", "Tensor bytes sent by the coordinator, by kind.", ["kind"])

# ---- coordinator: a full state volume (issue 14, item 3: disk) ---------------

STATE_FREE_BYTES = Gauge(
    "tandem_coordinator_state_free_bytes", "Free bytes on the coordinator's state volume (SQLite and tensor files)."
)
STATE_RESERVE_BYTES = Gauge(
    "tandem_coordinator_state_reserve_bytes", "Free space below which the coordinator refuses new uploads."
)
STATE_LOW_SPACE = Gauge(
    "tandem_coordinator_state_low_space", "1 while the state volume's free space is below the reserve."
)
ROUNDS_DEFERRED = Counter(
    "tandem_coordinator_rounds_deferred_no_space_total",
    "Times a round could not open or close because the state volume was full; it stays open and is retried.",
)
UPDATES_REJECTED.labels("no_space")

# ---- inference (cloud and edge alike) ---------------------------------------

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)

INFER_REQUEST_SECONDS = Histogram(
    "tandem_inference_request_duration_seconds",
    "Time to answer one inference request, by model, start layer and where it ran.",
    ["model", "start_layer", "placement"], buckets=_LATENCY_BUCKETS,
)
INFER_QUEUE_WAIT_SECONDS = Histogram(
    "tandem_inference_queue_wait_seconds", "Time a request waited for its batch to start, by model.",
    ["model"], buckets=_LATENCY_BUCKETS,
)
INFER_BATCH_ROWS = Histogram(
    "tandem_inference_batch_rows", "Rows (examples) per forward pass, by model.",
    ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
INFER_QUEUE_ROWS = Gauge("tandem_inference_queue_rows", "Rows waiting for a forward pass.")
INFER_STAGE_SECONDS = Histogram(
    "tandem_inference_stage_duration_seconds", "Compute time of one stage for one batch, by model and stage.",
    ["model", "stage"], buckets=_LATENCY_BUCKETS,
)
INFER_STAGE_SECONDS_PER_EXAMPLE = Gauge(
    "tandem_inference_stage_seconds_per_example",
    "Measured compute time of one stage per example (moving average), by model and stage.", ["model", "stage"],
)
INFER_DEVICE = Gauge("tandem_inference_device_info", "1 for the device this server runs models on.", ["device"])
INFER_REJECTED = Counter(
    "tandem_inference_rejected_total", "Inference requests refused, by model and reason.", ["model", "reason"]
)
INFER_LOADED_VERSIONS = Gauge("tandem_inference_loaded_versions", "Model versions held ready to serve.", ["model"])

# ---- placement controller -----------------------------------------------------

PLACEMENT_SPLIT_LAYER = Gauge(
    "tandem_placement_split_layer",
    "Placement in force per agent and model: stages run at the edge (0 all cloud, L all edge; -1 cascade).",
    ["agent", "model"],
)
PLACEMENT_SWITCHES = Counter("tandem_placement_switches_total", "Placement changes pushed to agents, by model.",
                             ["model"])

# ---- edge agent -------------------------------------------------------------

# The tree (docs/scale-out.md): which tier a process is, joined to its other series by
# instance; a region's own series, beside the coordinator's and the agent's it also exports.
TIER = Gauge("tandem_tier_info", "1, labelled with this process's tier (cloud, region, edge) and name.",
             ["tier", "name"])
REGION_AGENTS = Gauge("tandem_region_agents", "Agents connected to this region, as it tells its parent.")
REGION_PARTIALS = Counter("tandem_region_partials_total",
                          "The parent's tasks relayed, by outcome: ready (a partial aggregate to send) or skipped "
                          "(the region's agents missed its quorum before the parent's deadline).", ["outcome"])
REGION_ROUND_SECONDS = Histogram("tandem_region_round_seconds",
                                 "From the parent's task to its partial aggregate: the region's own round.",
                                 buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600))
EDGE_CONNECTED = Gauge("tandem_edge_connected", "1 while the agent's control stream to the cloud is open.")
EDGE_RECONNECTS = Counter("tandem_edge_reconnects_total", "Control stream re-openings after a break.")
EDGE_BYTES_SENT = Counter("tandem_edge_sent_bytes_total", "Tensor bytes sent by the agent, by kind.", ["kind"])
EDGE_BYTES_RECEIVED = Counter(
    "tandem_edge_received_bytes_total", "Tensor bytes received by the agent, by kind.", ["kind"]
)
EDGE_TRAIN_SECONDS = Histogram(
    "tandem_edge_train_duration_seconds", "Wall time of local training for one task.",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
EDGE_TASKS = Counter("tandem_edge_tasks_total", "Training tasks finished, by outcome.", ["outcome"])
EDGE_LOCAL_LOSS = Gauge("tandem_edge_local_loss", "Mean local training loss of the last task.")
EDGE_FALLBACKS = Counter(
    "tandem_edge_inference_fallbacks_total",
    "Requests the agent answered locally because the cloud could not, by model and reason.", ["model", "reason"],
)
EDGE_CASCADE_ROWS = Counter(
    "tandem_edge_cascade_rows_total", "Rows of cascade requests, by who answered them (edge or cloud).",
    ["model", "answered_by"],
)
EDGE_LINK_RTT = Gauge("tandem_edge_link_rtt_seconds", "Round-trip time of the link to the cloud (moving average).")
EDGE_LINK_BYTES_PER_SECOND = Gauge(
    "tandem_edge_link_bytes_per_second", "Throughput of the link to the cloud (moving average), by direction.",
    ["direction"],
)
EDGE_EXAMPLES = Counter(
    "tandem_edge_inference_examples_total", "Examples (rows) of inference requests the agent served, by model.",
    ["model"],
)
EDGE_CONFIDENCE_BELOW = Gauge(
    "tandem_edge_confidence_below_ratio",
    "Fraction of recent answers whose confidence was below a level: what a cascade would send up.",
    ["model", "threshold"],
)
EDGE_CANARY_AGREEMENT = Gauge(
    "tandem_edge_canary_agreement_ratio",
    "Fraction of compared rows on which a canary version agreed with the version it replaced, last heartbeat interval.",
    ["model"],
)
EDGE_LINK_UP = Gauge("tandem_edge_link_up", "1 while the agent believes the cloud reachable for inference.")
EDGE_PLACEMENT = Gauge(
    "tandem_edge_placement_split_layer",
    "Current placement per model: the number of stages run at the edge (0 cloud, L edge; -1 cascade).",
    ["model"],
)

# ---- stored files: corruption (issue 14, item 4) -----------------------------

FILES_CORRUPT = Counter(
    "tandem_store_corrupt_files_total",
    "Stored tensor files found not to match their recorded hash and quarantined, by kind (model, delta).",
    ["kind"],
)
for _kind in ("model", "delta"):
    FILES_CORRUPT.labels(_kind)
FILE_VERIFY_SECONDS = Histogram(
    "tandem_store_file_verify_duration_seconds",
    "Time to hash one stored tensor file against its recorded sha256 (once per file and change).",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30),
)
VERSIONS_QUARANTINED = Gauge(
    "tandem_store_quarantined_versions", "Model versions held back from serving because their file is corrupt.",
    ["model"],
)


def serve_metrics(address: str) -> tuple[str, int]:
    """Expose the default registry over HTTP at HOST:PORT (port 0 picks one)."""
    host, _, port = address.rpartition(":")
    try:
        server, _thread = start_http_server(int(port), addr=host or "0.0.0.0")
    except OSError as exc:
        raise ValueError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
    bound_host, bound_port = server.server_address[:2]
    return str(bound_host), int(bound_port)


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


_CHILDREN: dict[tuple[object, ...], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, remembered: several times cheaper, and it runs on every
    request. Only for labels from a bounded set (methods, codes, zoo models)."""
    key = (id(metric), *labels)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*labels)
    return found


def _code(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


@contextlib.contextmanager
def _observed(service: str, method: str, context: grpc.aio.ServicerContext) -> Iterator[None]:
    """Count and time one RPC, with the status code it ended with."""
    start, code = time.perf_counter(), "UNKNOWN"
    try:
        yield
        code = _code(context)
    except grpc.aio.AbortError:
        code = _code(context)
        raise
    except BaseException:
        code = "CANCELLED" if context.cancelled() else "UNKNOWN"
        raise
    finally:
        child(RPC_HANDLED, service, method, code).inc()
        child(RPC_SECONDS, service, method).observe(time.perf_counter() - start)


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    """Counts and times every RPC, unary and streaming alike."""

    def __init__(self) -> None:
        self._wrapped = Wrapped()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self._wrapped.get(handler_call_details.method, handler,
                                 lambda: _counted(handler, *_split(handler_call_details.method)))


def _counted(handler: grpc.RpcMethodHandler, service: str, method: str) -> grpc.RpcMethodHandler:
    @contextlib.asynccontextmanager
    async def observed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        with _observed(service, method, context):
            yield request

    return guarded(handler, observed)

# ---- issue 14, items 1, 5 and 7: claimed example counts, stalled and refused uploads ----

UPDATES_REJECTED.labels("idle")  # an upload ended for sending nothing within the idle timeout
UPLOAD_IDLE_TIMEOUTS = Counter(
    "tandem_coordinator_upload_idle_timeouts_total",
    "Upload streams ended DEADLINE_EXCEEDED for sending nothing within the idle timeout.",
)
PARTIAL_UPLOADS = Gauge(
    "tandem_coordinator_partial_uploads", "Broken uploads kept on disk for a resume, while their round is open."
)
PARTIAL_UPLOAD_BYTES = Gauge(
    "tandem_coordinator_partial_upload_bytes", "Bytes on disk of the broken uploads kept for a resume."
)
WEIGHTS_CAPPED = Counter(
    "tandem_coordinator_weights_capped_total",
    "Updates whose claimed example count was capped at the job's multiple of the round's median count.",
)
