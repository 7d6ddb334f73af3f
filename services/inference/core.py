"""The inference core: model lookup, key checks and HE dispatch, with no gRPC in it.

A request flows: check the key id and its record (owner, parameters) -> pick a
worker -> compute there (sending the key bytes only if that worker lacks them).
Streams run items concurrently (bounded) and batches part by part, each answer
tagged with its request id; one bad item fails only its own answer.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from encinfer.common.auth import Principal
from encinfer.common.errors import EncinferError, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from encinfer.he.batch import BatchLayout
from encinfer.he.keyinfo import check_key_id
from encinfer.he.params import CkksParams
from encinfer.inference import worker
from encinfer.inference.keys import KeySource, check_key_fits, record_owner
from encinfer.inference.pool import WorkerPool
from encinfer.modelinfo import ModelDescription

log = logging.getLogger(__name__)

# The worker function for each one-sample layout.
SINGLE_SAMPLE_LAYOUTS = {"latency": worker.predict_latency, "coeff": worker.predict_coeff}
# Batch parts handed to a worker per call: a call's round trip costs about one part's work.
PARTS_PER_CALL = 16


@dataclass
class Answer:
    """One streamed answer: ciphertexts, or an error for this item only."""

    request_id: str
    ciphertexts: list[bytes] = field(default_factory=list)
    n_samples: int = 0
    server_ms: float = 0.0
    error: EncinferError | None = None


def _fits(record_params, params: CkksParams, layout: str) -> bool:
    try:
        check_key_fits(record_params, params, layout)
    except FailedPrecondition:
        return False
    return True


class InferenceCore:
    def __init__(self, pool: WorkerPool, keys: KeySource, auth_enabled: bool,
                 max_inflight_per_stream: int = 8, max_open_batches: int = 4) -> None:
        self.pool = pool
        self.keys = keys
        self.auth_enabled = auth_enabled
        self.max_inflight = max_inflight_per_stream
        self.max_open_batches = max_open_batches
        # Every request checks its key against these.
        self._params = {(m.name, name): lay.params for m in pool.models for name, lay in m.layouts.items()}

    # ------------------------------------------------------------ models
    def models(self) -> list[ModelDescription]:
        return self.pool.models

    def model_info(self, name: str) -> ModelDescription:
        if not name:
            raise InvalidArgument("model name is empty; ListModels shows the served models")
        for m in self.pool.models:
            if m.name == name:
                return m
        raise NotFound(f"model {name!r} is not served here; served: "
                       f"{', '.join(m.name for m in self.pool.models) or 'none'}")

    def params(self, model: str, layout: str) -> CkksParams:
        params = self._params.get((model, layout))
        if params is None:
            self.model_info(model)  # NOT_FOUND for an unknown model
            raise InvalidArgument(f"model {model!r} has no {layout!r} layout")
        return params

    async def _checked_key(self, principal: Principal, model: str, key_id: str, layout: str) -> str:
        """The key id in its canonical form, once the caller's record says the key fits the layout."""
        params = self.params(model, layout)  # NOT_FOUND for an unknown model first
        key_id = check_key_id(key_id)
        record = await self.keys.record(key_id, principal, self.auth_enabled)
        try:
            check_key_fits(record.parameters, params, layout)
        except FailedPrecondition as e:
            # Often the right key in the wrong layout (a request that left `layout` unset means
            # the rotation layout): say which of the model's layouts it does fit.
            fits = [name for (m, name), other in self._params.items()
                    if m == model and name != layout and _fits(record.parameters, other, name)]
            if not fits:
                raise
            named = " or ".join(f"{name} (LAYOUT_{name.upper()})" for name in sorted(fits))
            raise FailedPrecondition(f"{e.message}. This key fits the model's {named} layout: state that layout "
                                     "in the request") from None
        return key_id

    # ------------------------------------------------------------ latency
    async def predict(self, principal: Principal, model: str, key_id: str, ciphertext: bytes,
                      layout: str = "latency") -> tuple[bytes, float]:
        """One single-sample input (latency or coeff layout); the time returned is the handler's
        (key checks, the hop to a worker, deserialization, compute, serialization), not the kernel's alone."""
        start = time.perf_counter()
        if not ciphertext:
            raise InvalidArgument(f"ciphertext is empty; send one encrypted input ({layout} layout)")
        if layout not in SINGLE_SAMPLE_LAYOUTS:
            raise InvalidArgument(f"Predict takes the latency or coeff layout, not {layout or 'none'!r}")
        key_id = await self._checked_key(principal, model, key_id, layout)
        owner = record_owner(principal, self.auth_enabled)
        index = self.pool.pick()
        result, _kernel_ms = await self.pool.with_key(index, lambda: self.keys.data(key_id, owner),
                                                      SINGLE_SAMPLE_LAYOUTS[layout], (model, key_id), (ciphertext,))
        return result, (time.perf_counter() - start) * 1000

    # ------------------------------------------------------------ streams
    def stream(self, principal: Principal) -> StreamSession:
        return StreamSession(self, principal)


class _Batch:
    def __init__(self, request_id: str, total: int, n_samples: int) -> None:
        self.request_id = request_id
        self.id = f"{uuid.uuid4().hex}:{request_id}"
        self.total = total
        self.n_samples = n_samples
        self.next_position = 0
        self.parts: asyncio.Queue = asyncio.Queue(maxsize=2 * PARTS_PER_CALL)
        self.task: asyncio.Task | None = None
        self.worker = -1
        self.started = time.perf_counter()


@dataclass(frozen=True)
class StreamHeader:
    model: str
    key_id: str
    layout: str  # "latency" | "batch" | "" (not stated)


@dataclass(frozen=True)
class StreamItem:
    request_id: str
    model: str
    key_id: str
    ciphertext: bytes


@dataclass(frozen=True)
class StreamBatchPart:
    request_id: str
    position: int
    n_samples: int
    ciphertext: bytes


StreamMessage = StreamHeader | StreamItem | StreamBatchPart


class StreamSession:
    """One PredictStream call: `run(messages)` yields its answers as they are ready."""

    def __init__(self, core: InferenceCore, principal: Principal) -> None:
        self.core = core
        self.principal = principal
        self.answers: asyncio.Queue[Answer | None] = asyncio.Queue()
        self.model = ""
        self.key_id = ""
        self.layout = ""
        self._slots = asyncio.Semaphore(core.max_inflight)
        self._tasks: set[asyncio.Task] = set()
        self._batches: dict[str, _Batch] = {}
        self._failed: set[str] = set()

    async def run(self, messages: AsyncIterator[StreamMessage]) -> AsyncIterator[Answer]:
        """Reads the messages while answers stream out; a stream-level error (a bad header,
        an undecodable message) ends the call; an item's error is only its own answer."""
        reader = asyncio.create_task(self._read(messages))
        getter: asyncio.Future | None = None
        try:
            while True:
                getter = asyncio.ensure_future(self.answers.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    answer = getter.result()
                    if answer is None:
                        return
                    yield answer
                    continue
                getter.cancel()
                reader.result()  # raises the stream-level error
                # The reader ended normally: the None sentinel is queued; keep draining.
                while (answer := await self.answers.get()) is not None:
                    yield answer
                return
        finally:
            if not reader.done():
                reader.cancel()
            if getter is not None and not getter.done():
                getter.cancel()  # a cancelled call leaves it waiting on the queue forever otherwise
            await self.cancel()

    async def _read(self, messages: AsyncIterator[StreamMessage]) -> None:
        first = True
        async for msg in messages:
            if isinstance(msg, StreamHeader):
                if not first:
                    raise InvalidArgument("the stream header must be the first message")
                self.header(msg.model, msg.key_id, msg.layout)
            elif isinstance(msg, StreamItem):
                await self.item(msg.request_id, msg.model, msg.key_id, msg.ciphertext)
            else:
                await self.batch_part(msg.request_id, msg.position, msg.n_samples, msg.ciphertext)
            first = False
        await self.finish()

    def header(self, model: str, key_id: str, layout: str) -> None:
        if self.model:
            raise InvalidArgument("the stream header was sent twice; send it once, first")
        if layout not in ("latency", "batch", "coeff"):
            raise InvalidArgument("the stream header needs layout LAYOUT_COEFF, LAYOUT_LATENCY or LAYOUT_BATCH")
        self.core.params(model, layout)
        self.model, self.key_id, self.layout = model, key_id, layout

    async def item(self, request_id: str, model: str, key_id: str, ciphertext: bytes) -> None:
        """Starts one latency item; waits only for a free slot (back-pressure)."""
        await self._slots.acquire()
        task = asyncio.create_task(self._run_item(request_id, model or self.model, key_id or self.key_id, ciphertext))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_item(self, request_id: str, model: str, key_id: str, ciphertext: bytes) -> None:
        try:
            ct, ms = await self.core.predict(self.principal, model, key_id, ciphertext,
                                             "coeff" if self.layout == "coeff" else "latency")
            await self.answers.put(Answer(request_id, [ct], 1, ms))
        except EncinferError as e:
            await self.answers.put(Answer(request_id, error=e))
        except Exception as e:  # noqa: BLE001 - a bug must still answer this item, not hang the stream
            await self.answers.put(Answer(request_id, error=_internal(e, request_id)))
        finally:
            self._slots.release()

    async def batch_part(self, request_id: str, position: int, n_samples: int, ciphertext: bytes) -> None:
        if request_id in self._failed:
            return  # the rest of a failed batch is dropped; its error was already answered
        batch = self._batches.get(request_id)
        try:
            if self.layout != "batch":
                raise InvalidArgument("batch parts need a stream header with layout LAYOUT_BATCH first")
            if batch is None:
                layout = self.core.model_info(self.model).layouts["batch"]
                assert isinstance(layout, BatchLayout)
                total = len(layout.feature_indices)
                check_position(position, 0, total)
                check_batch_count(len(self._batches), self.core.max_open_batches)
                if n_samples <= 0:
                    raise InvalidArgument("n_samples must be set on the first part of a batch")
                batch = _Batch(request_id, total, n_samples)
                self._batches[request_id] = batch
                batch.task = asyncio.create_task(self._run_batch(batch))
            else:
                check_position(position, batch.next_position, batch.total)
            batch.next_position += 1
        except EncinferError as e:
            self._fail(request_id, e)
            return
        await batch.parts.put((position, ciphertext))

    def _fail(self, request_id: str, error: EncinferError) -> None:
        self._failed.add(request_id)
        batch = self._batches.pop(request_id, None)
        if batch is not None:
            # The reader may be blocked putting a part into this batch's full queue: nobody
            # reads it any more, so empty it (that wakes the reader; later parts are dropped).
            while not batch.parts.empty():
                batch.parts.get_nowait()
            if batch.task is not None and batch.task is not asyncio.current_task():
                batch.task.cancel()
        self.answers.put_nowait(Answer(request_id, error=error))

    async def _run_batch(self, batch: _Batch) -> None:
        pool, core = self.core.pool, self.core
        pending: list[asyncio.Future] = []
        started = False
        try:
            self.key_id = await core._checked_key(self.principal, self.model, self.key_id, "batch")
            batch.worker = pool.pick()
            # From here on the worker may hold state for this batch, even if we are cancelled
            # while it starts (abort is queued behind the start and is a no-op for unknown ids).
            started = True
            await pool.with_key(batch.worker,
                                lambda: core.keys.data(self.key_id, record_owner(self.principal, core.auth_enabled)),
                                worker.batch_start,
                                (batch.id, self.model, self.key_id), (batch.n_samples,))
            received = 0
            while received < batch.total:
                group = [await batch.parts.get()]
                while len(group) < PARTS_PER_CALL and not batch.parts.empty():
                    group.append(batch.parts.get_nowait())
                received += len(group)
                # The worker runs calls in order, so groups are pipelined, not awaited one by one.
                pending.append(asyncio.ensure_future(pool.call(batch.worker, worker.batch_add, batch.id, group)))
                if len(pending) >= 4:
                    await pending.pop(0)
            for fut in pending:
                await fut
            pending.clear()
            cts, _ = await pool.call(batch.worker, worker.batch_finish, batch.id)
            started = False
            elapsed = (time.perf_counter() - batch.started) * 1000
            self._batches.pop(batch.request_id, None)
            await self.answers.put(Answer(batch.request_id, cts, batch.n_samples, elapsed))
        except EncinferError as e:
            self._fail(batch.request_id, e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - as in _run_item
            self._fail(batch.request_id, _internal(e, batch.request_id))
        finally:
            for fut in pending:
                fut.cancel()
            if started:
                await _quietly(pool.call(batch.worker, worker.batch_abort, batch.id))

    async def finish(self) -> None:
        """The client closed its side: wait for every item, fail incomplete batches."""
        for batch in list(self._batches.values()):
            if batch.next_position < batch.total:
                self._fail(batch.request_id, InvalidArgument(
                    f"the stream ended after {batch.next_position} of {batch.total} parts of batch "
                    f"{batch.request_id!r}"))
        await asyncio.gather(*self._tasks, *(b.task for b in self._batches.values() if b.task),
                             return_exceptions=True)
        await self.answers.put(None)

    async def cancel(self) -> None:
        """The call was cancelled: stop every item and free the workers' batch state."""
        for task in list(self._tasks):
            task.cancel()
        for batch in list(self._batches.values()):
            if batch.task:
                batch.task.cancel()
        await asyncio.gather(*self._tasks, *(b.task for b in self._batches.values() if b.task),
                             return_exceptions=True)


def _internal(exc: Exception, request_id: str) -> EncinferError:
    log.error("unhandled error in a stream item", exc_info=exc, extra={"fields": {"request_id": request_id}})
    return EncinferError(f"internal error on item {request_id!r}; the server log has the details")


async def _quietly(coro) -> None:
    try:
        await coro
    except Exception:  # best-effort clean-up of a batch that already failed
        log.debug("batch clean-up failed", exc_info=True)


def check_batch_count(open_batches: int, limit: int) -> None:
    if open_batches >= limit:
        raise ResourceExhausted(f"at most {limit} batches may be open at once on one stream; "
                                "finish one (send its last part) before starting another")


def check_position(position: int, expected: int, total: int) -> None:
    if position != expected:
        raise InvalidArgument(f"batch part {position} arrived, expected part {expected} of {total} "
                              "(parts of a batch are sent in order)")
