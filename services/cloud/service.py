"""Thin gRPC adapters for the coordinator: check identity, delegate, translate errors."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Mapping

import grpc

from cloud.canary import RolloutPolicy
from cloud.intake import UpdateIntake
from cloud.jobs import JobManager
from cloud.limits import AgentLimits
from cloud.limits import Peer as LimitPeer
from cloud.models import ModelRepository
from cloud.placement import PlacementController
from cloud.registry import Registry, Session
from cloud.rollouts import Rollouts
from cloud.spec import JobSpec
from cloud.store import ModelEvent, Stage, Store, VersionRow
from tandem import config, metrics, staged, tasks
from tandem.certs import MEMBER_ROLES, ROLE_ADMIN, ROLE_REGION, ROLE_REPLICA, member_id
from tandem.errors import InvalidArgument, NotFound, ResourceExhausted, TandemError, clip, drain, grpc_errors, grpc_stream_errors
from tandem.timestamps import timestamp
from tandem.tls import Peer, require_peer, require_role
from tandem.v1 import admin_pb2, admin_pb2_grpc, coordinator_pb2_grpc
from tandem.v1 import coordinator_pb2 as pb

HELLO_TIMEOUT_SECONDS = 30.0
# What one agent may claim to hold. A billion examples is beyond any edge device (the
# largest public image sets are of that order), and far below where a claim could
# overflow a weight or swamp every other agent's in a float64 sum.
MAX_HELLO_EXAMPLES = 10**9
MAX_HELLO_AGENTS = 10**6  # agents a region may say it holds
MAX_PROBE_BYTES = 1 << 20
REFUSAL_DELAY_SECONDS = 1.0  # a control stream over its agent's rates ends this late
MAX_MEASUREMENTS = 256  # link, and per served model its stage times and request rate
MAX_SIGNALS = 256  # serving signals per heartbeat: one per model version served
# A shorter round cannot be met by any agent, and a round that misses its quorum is
# retried at once: with a deadline of nothing, the retries never yield the event loop.


def _merge_measurements(into: dict[str, float], new: Mapping[str, float]) -> None:
    """Keep a bounded set of short, finite measurements: a peer cannot grow our memory."""
    for name, value in new.items():
        if len(name) <= 64 and math.isfinite(value) and (name in into or len(into) < MAX_MEASUREMENTS):
            into[name] = value


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(
        self, store: Store, registry: Registry, models: ModelRepository, jobs: JobManager, intake: UpdateIntake,
        rollouts: Rollouts, heartbeat_interval: float, limits: AgentLimits | None = None,
    ) -> None:
        self._limits = limits  # Connect and heartbeat rates per agent; None: unlimited
        self._rollouts = rollouts
        self._store = store
        self._registry = registry
        self._models = models
        self._jobs = jobs
        self._intake = intake
        self._heartbeat_interval = heartbeat_interval

    @grpc_stream_errors
    async def Connect(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CoordinatorMessage]:
        try:
            async for message in self._control(request_iterator, context):
                yield message
        except TandemError as exc:
            if isinstance(exc, ResourceExhausted):
                # An agent over its rates is answered late: a refusal costs the coordinator a
                # call, and one that reconnects at once would otherwise make hundreds of them a
                # second. Waiting costs nothing, and the wait counts as one of its streams.
                await asyncio.sleep(REFUSAL_DELAY_SECONDS)
            # An agent never closes its side of the control stream: read only a little of
            # what it still sends (enough for a short burst, so that a client caught writing
            # sees this status and not INTERNAL), never seconds more of a flood.
            await drain(request_iterator, context, limit_bytes=8 << 10, seconds=0.2)
            await context.abort(exc.code, clip(str(exc)))

    async def _control(
        self, request_iterator: AsyncIterator[pb.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CoordinatorMessage]:
        """The control stream: a Hello, then messages for the agent until it goes or is replaced."""
        peer = require_peer(context, *MEMBER_ROLES)  # parsed once: each heartbeat only checks revocation
        identity = peer.identity
        member = member_id(identity)  # an agent's name, or region:NAME
        counters = self._limits.connect(identity) if self._limits is not None else None
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that arrives as the message does (CPython gh-86296), and the handler would run on.
            async with asyncio.timeout(HELLO_TIMEOUT_SECONDS):
                first = await anext(request_iterator, None)
        except TimeoutError:
            raise InvalidArgument(f"no Hello within {HELLO_TIMEOUT_SECONDS:.0f} s of connecting") from None
        if first is None or not first.HasField("hello"):
            raise InvalidArgument("the first message on Connect must be a Hello")
        hello = first.hello
        if not 0 <= hello.num_examples <= MAX_HELLO_EXAMPLES:
            raise InvalidArgument(f"malformed Hello: num_examples {hello.num_examples} is not within "
                                  f"0..{MAX_HELLO_EXAMPLES:.0e}")
        if not 0 <= hello.agents <= MAX_HELLO_AGENTS:
            raise InvalidArgument(f"malformed Hello: agents {hello.agents} is not within 0..{MAX_HELLO_AGENTS:.0e}")
        if identity.role != ROLE_REGION:
            hello.agents = 0  # only a region stands for agents of its own
        if len(hello.device) > 64 or len(hello.models) > 256:
            raise InvalidArgument("malformed Hello: device over 64 characters or over 256 models")
        _check_offers(hello)
        session = await self._registry.connect(member, hello, context.peer())
        reader: asyncio.Task[Exception | None] | None = None
        try:
            self._store.agent_connected(member, hello.num_examples, hello.device)
            session.send(
                pb.CoordinatorMessage(
                    welcome=pb.Welcome(agent_id=member, heartbeat_interval_seconds=self._heartbeat_interval,
                                       models=self._rollouts.notices(member))
                )
            )
            self._registry.announce(session)
            reader = asyncio.create_task(self._read(session, request_iterator, peer, counters))
            while (message := await session.queue.get()) is not None:
                yield message
            if reader.done() and (error := reader.result()) is not None:
                raise error  # a malformed or over-limit message ends the stream with its status
            if session.ended_by is not None:
                raise session.ended_by  # replaced by a newer stream of the same agent (this one was silent)
        finally:
            if reader is not None:
                reader.cancel()
            self._store.agent_seen(member, session.last_seen)  # heartbeats stay in memory until here
            await self._registry.disconnect(session)

    async def _read(
        self, session: Session, request_iterator: AsyncIterator[pb.AgentMessage], peer: Peer,
        counters: LimitPeer | None,
    ) -> Exception | None:
        """Heartbeats until the agent closes its side; what ended the stream, if the agent's
        fault (a revoked certificate ends it UNAUTHENTICATED at its next heartbeat, heartbeats
        above the agent's rate RESOURCE_EXHAUSTED)."""
        try:
            async for message in request_iterator:
                if message.HasField("heartbeat"):
                    peer.check()
                    if self._limits is not None:
                        self._limits.heartbeat(counters)
                    session.last_seen = time.time()
                    _merge_measurements(session.measurements, message.heartbeat.measurements)
                    self._rollouts.observe(session.agent_id, message.heartbeat.serving[:MAX_SIGNALS])
                    session.send(pb.CoordinatorMessage(heartbeat_ack=pb.HeartbeatAck(seq=message.heartbeat.seq)))
                elif message.HasField("declined"):
                    peer.check()
                    self._jobs.declined(session.agent_id, message.declined)
                elif message.HasField("failed"):
                    peer.check()
                    self._jobs.failed(session.agent_id, message.failed)
        except (grpc.RpcError, asyncio.CancelledError):
            pass
        except Exception as exc:  # noqa: BLE001 - handed to Connect, which answers with its status
            return exc
        finally:
            session.close()
        return None

    @grpc_errors
    async def UploadUpdate(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.UpdateChunk], context: grpc.aio.ServicerContext
    ) -> pb.UpdateReceipt:
        identity = require_role(context, *MEMBER_ROLES)
        return await self._intake.receive(member_id(identity), request_iterator, identity.role)

    @grpc_stream_errors
    async def DownloadModel(  # noqa: N802
        self, request: pb.ModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelChunk]:
        require_role(context, *MEMBER_ROLES, ROLE_ADMIN, ROLE_REPLICA)
        if request.skip_chunks < 0 or request.have_version < 0:
            raise InvalidArgument("skip_chunks and have_version must not be negative")
        # Checked against its recorded hash first: a corrupt file is DATA_LOSS before any byte goes out.
        header, chunks = await self._models.response(request.model, request.version, request.have_version)
        if request.skip_chunks > header.total_chunks:
            raise InvalidArgument(f"skip_chunks {request.skip_chunks} is past the {header.total_chunks} chunks")
        message = pb.ModelChunk(header=header)
        sent = message.ByteSize()
        yield message
        # Chunks are read from the version's file as they go (1 MiB preads from the
        # page cache: short enough to stay on the event loop).
        for index, chunk in enumerate(chunks()):
            if index >= request.skip_chunks:
                message = pb.ModelChunk(tensor=chunk)
                sent += message.ByteSize()
                yield message
        metrics.BYTES_SENT.labels("delta" if header.steps else "model").inc(sent)
        self._jobs.count_download(header.model, header.version, sent)

    @grpc_errors
    async def UploadStatus(  # noqa: N802
        self, request: pb.UpdateHeader, context: grpc.aio.ServicerContext
    ) -> pb.UploadProgress:
        identity = require_role(context, *MEMBER_ROLES)
        return pb.UploadProgress(chunks_received=self._intake.progress(member_id(identity), request))


    @grpc_errors
    async def Probe(self, request: pb.ProbeRequest, context: grpc.aio.ServicerContext) -> pb.ProbeResponse:  # noqa: N802
        require_role(context, *MEMBER_ROLES)
        if not 0 <= request.reply_bytes <= MAX_PROBE_BYTES:
            raise InvalidArgument(f"reply_bytes must be in 0..{MAX_PROBE_BYTES}")
        return pb.ProbeResponse(payload=bytes(request.reply_bytes))


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(
        self, store: Store, registry: Registry, models: ModelRepository, jobs: JobManager,
        placement: PlacementController, rollouts: Rollouts,
    ) -> None:
        self._placement = placement
        self._rollouts = rollouts
        self._installed: frozenset[str] | None = None  # the tasks installed here, for ListModelVersions
        self._store = store
        self._registry = registry
        self._models = models
        self._jobs = jobs

    @grpc_errors
    async def ListAgents(  # noqa: N802
        self, request: admin_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAgentsResponse:
        require_role(context, ROLE_ADMIN)
        response = admin_pb2.ListAgentsResponse()
        for row in self._store.list_agents():
            session = self._registry.get(row.agent)
            last_seen = session.last_seen if session is not None else row.last_seen
            info = admin_pb2.AgentInfo(
                agent_id=row.agent, connected=session is not None, last_seen=timestamp(last_seen),
                num_examples=row.num_examples, device=row.device, connects=row.connects,
            )
            if session is not None:
                info.connected_since.CopyFrom(timestamp(session.connected_since))
                info.measurements.update(session.measurements)
                info.labels.update(session.hello.labels)
                info.tasks.extend(session.hello.tasks)
                if session.is_region:  # its agents now, as its heartbeats say (its Hello: when it connected)
                    info.agents, info.num_examples = session.agents, session.examples
            response.agents.append(info)
        return response

    @grpc_errors
    async def StartJob(  # noqa: N802
        self, request: admin_pb2.StartJobRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Job:
        require_role(context, ROLE_ADMIN)
        # Checking the spec loads its task (an import and a build): off the event loop.
        spec = await asyncio.to_thread(JobSpec.from_proto, request.spec)
        job_id = await self._jobs.start_job(spec)
        return self._jobs.describe(job_id)

    @grpc_errors
    async def GetJob(self, request: admin_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> admin_pb2.Job:  # noqa: N802
        require_role(context, ROLE_ADMIN)
        return self._jobs.describe(request.job_id)

    @grpc_errors
    async def ListJobs(  # noqa: N802
        self, request: admin_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListJobsResponse:
        require_role(context, ROLE_ADMIN)
        return admin_pb2.ListJobsResponse(jobs=self._jobs.list_jobs())

    @grpc_errors
    async def StopJob(self, request: admin_pb2.StopJobRequest, context: grpc.aio.ServicerContext) -> admin_pb2.Job:  # noqa: N802
        require_role(context, ROLE_ADMIN)
        await self._jobs.stop_job(request.job_id)
        return self._jobs.describe(request.job_id)

    @grpc_errors
    async def PublishModel(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.ModelChunk], context: grpc.aio.ServicerContext
    ) -> admin_pb2.ModelVersion:
        require_role(context, ROLE_ADMIN)
        return _model_version(await self._models.receive(request_iterator), Stage.CANDIDATE)

    @grpc_errors
    async def ListPlacements(  # noqa: N802
        self, request: admin_pb2.ListPlacementsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListPlacementsResponse:
        require_role(context, ROLE_ADMIN)
        return admin_pb2.ListPlacementsResponse(placements=self._placement.list(request.agent, request.model))

    @grpc_errors
    async def PinPlacement(  # noqa: N802
        self, request: admin_pb2.PinPlacementRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.PlacementInfo:
        require_role(context, ROLE_ADMIN)
        await staged.prepare([request.model])  # its split points are found off the event loop
        return self._placement.pin(request.agent, request.model, request.placement)

    @grpc_errors
    async def UnpinPlacement(  # noqa: N802
        self, request: admin_pb2.UnpinPlacementRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.PlacementInfo:
        require_role(context, ROLE_ADMIN)
        return self._placement.unpin(request.agent, request.model)

    @grpc_errors
    async def ListModelVersions(  # noqa: N802
        self, request: admin_pb2.ListModelVersionsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListModelVersionsResponse:
        require_role(context, ROLE_ADMIN, ROLE_REPLICA)  # replicas follow the serving versions
        rows = self._store.list_versions(request.model)
        stages = {name: self._store.stages(name) for name in {v.model for v in rows}}
        response = admin_pb2.ListModelVersionsResponse(
            versions=[_model_version(v, self._stage(stages[v.model], v)) for v in rows]
        )
        if self._installed is None:  # read once: an installed task is loaded for good (tandem.tasks)
            self._installed = frozenset(tasks.names())
        installed = self._installed
        for name in sorted(installed | set(self._store.version_models())):
            if request.model and name != request.model:
                continue
            mine = [v.version for v in rows if v.model == name]
            response.models.append(admin_pb2.ModelSummary(
                model=name, installed=name in installed, serving_version=self._store.serving_version(name),
                versions=len(mine), newest_version=max(mine, default=0), rollout=self._rollouts.status(name)))
        return response

    def _stage(self, stages: Mapping[int, Stage], v: VersionRow) -> str:
        rollout = self._rollouts.in_progress(v.model)
        return "canary" if rollout is not None and rollout.version == v.version else stages.get(v.version, Stage.CANDIDATE)

    # ---- model lifecycle (docs/lifecycle.md) ------------------------------------

    @grpc_errors
    async def PromoteModel(  # noqa: N802
        self, request: admin_pb2.PromoteModelRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ModelVersion:
        identity = require_role(context, ROLE_ADMIN)
        if not request.model:
            raise InvalidArgument("model name is required")
        policy = RolloutPolicy.from_proto(request.rollout)
        staged = self._rollouts.promote(request.model, request.version, policy, identity.name,
                                        request.reason[:500] or "promoted by an operator")
        return _model_version(self._models.version(request.model, request.version),
                              "canary" if staged is not None else Stage.SERVING)

    @grpc_errors
    async def RollbackModel(  # noqa: N802
        self, request: admin_pb2.RollbackModelRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ModelVersion:
        identity = require_role(context, ROLE_ADMIN)
        if not request.model:
            raise InvalidArgument("model name is required")
        reason = request.reason[:500] or "rolled back by an operator"
        if self._rollouts.in_progress(request.model) is not None:  # abort it: the canary serves what everyone does
            rollout = self._rollouts.abort(request.model, identity.name, reason)
            return _model_version(self._models.version(request.model, rollout.previous), Stage.SERVING)
        row, _ = self._models.rollback(request.model, identity.name, reason)
        return _model_version(row, Stage.SERVING)

    @grpc_errors
    async def GetModelHistory(  # noqa: N802
        self, request: admin_pb2.GetModelHistoryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ModelHistory:
        require_role(context, ROLE_ADMIN)
        if not request.model:
            raise InvalidArgument("model name is required")
        rows = self._store.list_versions(request.model, quarantined=True)
        events = self._models.events(request.model)
        if not rows and not events:
            raise NotFound(f"model {request.model!r} has no version")
        stages = self._store.stages(request.model)
        return admin_pb2.ModelHistory(
            model=request.model, serving_version=self._store.serving_version(request.model),
            versions=[_model_version(v, self._stage(stages, v)) for v in rows],
            events=[_model_event(e) for e in events], rollouts=self._rollouts.history(request.model),
        )


def _model_version(v: VersionRow, stage: str = "") -> admin_pb2.ModelVersion:
    return admin_pb2.ModelVersion(
        model=v.model, version=v.version, sha256=v.sha256, job_id=v.job_id or "", round=v.round or 0,
        created=timestamp(v.created), bytes=v.bytes, origin=v.origin, metrics=dict(v.metrics), eval=v.eval,
        stage=str(stage),
    )


def _model_event(e: ModelEvent) -> admin_pb2.ModelEvent:
    return admin_pb2.ModelEvent(event=e.event, version=e.version, previous=e.previous, actor=e.actor,
                                reason=e.reason, at=timestamp(e.at))


def _check_offers(hello: pb.Hello) -> None:
    """InvalidArgument unless a Hello's labels and task offers are few and short."""
    try:
        config.parse_labels((f"{k}={v}" for k, v in hello.labels.items()), "Hello label")
    except config.ConfigError as exc:
        raise InvalidArgument(f"malformed Hello: {exc}") from None
    if len(hello.tasks) > 256:
        raise InvalidArgument("malformed Hello: over 256 task offers")
    for offer in hello.tasks:
        if not 0 < len(offer.name) <= 200 or len(offer.fingerprint) > 64 or len(offer.reason) > 2048:
            raise InvalidArgument("malformed Hello: a task offer's name (1-200), fingerprint (64) or reason "
                                  "(2048 characters) is out of bounds")
