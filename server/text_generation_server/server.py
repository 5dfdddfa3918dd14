"""The gRPC shard: `TextGenerationService` (proto/generate.proto) over one loaded model.

State between calls is the requests the engine holds (and the KV cache they point into). Model work (Warmup,
Step, ClearCache) runs one call at a time on the main thread (`ModelThread`); Info, Health and
ServiceDiscovery answer on gRPC's threads, also while a long Step runs.

Error policy (`ErrorPolicy`, the only place that maps exceptions to statuses):
  * a bad request (`ShardError`, or a `ValueError` from the engine, which checks a whole plan before it changes
    anything) -> its gRPC status and message; the shard keeps serving;
  * anything else -> logged with its traceback, INTERNAL returned, then the process stops and exits non-zero
    (the device may be unusable; the launcher restarts or reports the shard).
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch
from loguru import logger

from text_generation_server import device as device_layer
from text_generation_server import pb_convert
from text_generation_server.models.flash_causal_lm import FlashCausalLM
from text_generation_common.pb import generate_pb2, generate_pb2_grpc
from text_generation_common.sockets import SocketInUse, claim_unix_socket

FEATURES = ("top_n_tokens", "prefill_logprobs", "chunked_prefill", "grammar")
# How long step k + 1 waits for step k (StepRequest.step_id). The router sends them a few microseconds apart, so
# step k is late only when it was lost (its call failed on the router's side); step k + 1 then runs without it.
STEP_ORDER_WAIT_S = 2.0
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with its terminating NUL


class ShardError(Exception):
    """A request the shard refuses; the shard stays healthy."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(ShardError):
    code = grpc.StatusCode.FAILED_PRECONDITION


def uds_url(uds_path: str | Path, rank: int) -> str:
    return f"unix://{uds_path}-{rank}"


class ErrorPolicy(grpc.ServerInterceptor):
    """Bad requests become their status; unexpected errors become INTERNAL and shut the shard down."""

    def __init__(self, on_fatal):
        self._on_fatal = on_fatal
        self.fatal = threading.Event()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def guarded(request, context):
            if self.fatal.is_set():
                context.abort(
                    grpc.StatusCode.UNAVAILABLE, "the shard is shutting down after an internal error"
                )
            try:
                return inner(request, context)
            except ShardError as e:
                logger.warning(f"{method}: {e.code.name}: {e}")
                context.abort(e.code, str(e))
            except ValueError as e:
                logger.warning(f"{method}: INVALID_ARGUMENT: {e}")
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except Exception as e:  # noqa: BLE001 - the policy: anything else is fatal
                logger.opt(exception=e).error(
                    f"{method}: internal error, the shard will exit: {type(e).__name__}: {e}"
                )
                self.fatal.set()
                self._on_fatal()
                context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class ModelThread:
    """Runs every model call on the thread that loaded the model (the shard's main thread).

    OpenMP keeps a team of worker threads per calling thread. Torch work started from gRPC's worker threads
    makes more teams, whose idle workers then compete with the active ones for the cores: on 2 cores a bfloat16
    batch-1 decode step took 20 ms with all torch work on one thread, and 31 ms once several threads had run
    some. So gRPC threads only hand model calls over here and wait; calls run one at a time, in arrival order.
    """

    def __init__(self):
        self._work: queue.SimpleQueue = queue.SimpleQueue()

    def call(self, function, *args):
        """Run `function(*args)` on the model thread; its result or exception comes back to the caller."""
        return self.submit(function, *args).result()

    def submit(self, function, *args) -> futures.Future:
        """Queue `function(*args)` for the model thread; the future of its result."""
        future: futures.Future = futures.Future()
        self._work.put((future, function, args))
        return future

    def run_until(self, stop: threading.Event) -> None:
        """The model thread's loop: run handed-over calls until `stop` is set, then refuse the rest."""
        while not stop.is_set():
            try:
                future, function, args = self._work.get(timeout=0.5)
            except queue.Empty:
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args))
            except BaseException as e:  # noqa: BLE001 - handed back to the caller's thread, which raises it
                future.set_exception(e)
        while True:
            try:
                future, _, _ = self._work.get_nowait()
            except queue.Empty:
                return
            future.set_exception(FailedPrecondition("the shard is stopping"))


class TextGenerationService(generate_pb2_grpc.TextGenerationServiceServicer):
    def __init__(
        self,
        model: FlashCausalLM,
        model_id: str,
        memory_fraction: float,
        uds_path: str | Path,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.model = model
        self.model_id = model_id
        self.memory_fraction = memory_fraction
        self.uds_path = uds_path
        self.rank = rank
        self.world_size = world_size
        self.model_thread = ModelThread()
        self._step_order = threading.Condition()
        self._last_step_id = 0  # the last step_id handed to the model thread since ClearCache
        self._steps_waiting: set[int] = set()  # step_ids that arrived and wait for their predecessor

    # ----- answered on gRPC's threads, while a model call may run -----------------------------------------

    def Info(self, request, context):
        model, config = self.model, self.model.config
        kv_cache = model.kv_cache
        return generate_pb2.InfoResponse(
            model_id=self.model_id,
            architecture=config.architecture,
            dtype=str(model.dtype),
            device_type=model.device.type,
            block_size=kv_cache.block_size if kv_cache is not None else model.block_size,
            world_size=self.world_size,
            vocab_size=config.vocab_size,
            max_position_embeddings=config.max_position_embeddings,
            eos_token_ids=sorted(model.eos_token_ids),
            features=FEATURES,
            dynamic_rope=model.rotary.is_dynamic,
            kernels=model.ops.name,
        )

    def ServiceDiscovery(self, request, context):
        return generate_pb2.ServiceDiscoveryResponse(
            urls=[uds_url(self.uds_path, rank) for rank in range(self.world_size)]
        )

    def Health(self, request, context):
        device = self.model.device
        value = (torch.ones(2, device=device) * 2).sum()
        device_layer.synchronize(device)
        if value.item() != 4.0:
            raise RuntimeError(f"the device {device} computed 2 + 2 = {value.item()}")
        return generate_pb2.HealthResponse()

    # ----- model calls: run on the model thread, one at a time ---------------------------------------------

    def ClearCache(self, request, context):
        with self._step_order:
            self._last_step_id = 0  # a router's steps count from 1 after it cleared the shard
        return self.model_thread.call(self._ClearCache, request)

    def _ClearCache(self, request):
        self.model.clear()
        device_layer.empty_cache(self.model.device)
        return generate_pb2.ClearCacheResponse()

    def Warmup(self, request, context):
        return self.model_thread.call(self._Warmup, request)

    def _Warmup(self, request):
        kv_cache = self.model.warmup(
            request.max_input_tokens,
            request.max_prefill_tokens,
            request.max_total_tokens,
            self.memory_fraction,
        )
        logger.info(
            f"warmup: KV cache of {kv_cache.num_blocks} blocks × {kv_cache.block_size} tokens "
            f"({kv_cache.num_slots} tokens)"
        )
        return generate_pb2.WarmupResponse(
            num_blocks=kv_cache.num_blocks,
            block_size=kv_cache.block_size,
            max_supported_total_tokens=kv_cache.num_slots,
        )

    def Step(self, request, context):
        """Handed to the model thread in step_id order (unnumbered steps on arrival). A step whose predecessor
        is lost runs without it after STEP_ORDER_WAIT_S (those behind it keep their order); the engine refuses it
        if it refers to what never ran."""
        step_id = request.step_id
        with self._step_order:
            if step_id > 1:
                self._wait_for_predecessor(step_id)
            self._last_step_id = max(self._last_step_id, step_id)
            answer = self.model_thread.submit(self._Step, request)
            self._step_order.notify_all()
        return answer.result()

    def _wait_for_predecessor(self, step_id: int) -> None:
        """Wait (holding `_step_order`) until step `step_id - 1` has been handed over. A predecessor that has
        arrived and is itself waiting is waited for as long as it takes: it goes at its own deadline at the
        latest, so steps behind a lost one still go in their order."""
        self._steps_waiting.add(step_id)
        deadline = time.monotonic() + STEP_ORDER_WAIT_S
        try:
            while self._last_step_id < step_id - 1:
                if step_id - 1 in self._steps_waiting:
                    self._step_order.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    logger.warning(f"step {step_id} runs without step {step_id - 1}, which did not come")
                    return
                self._step_order.wait(remaining)
        finally:
            self._steps_waiting.discard(step_id)

    def _Step(self, request):
        start = time.perf_counter_ns()
        if self.model.kv_cache is None:
            raise FailedPrecondition("Step before Warmup: the KV cache is not allocated; call Warmup first")
        generations = self.model.step(pb_convert.step_from_pb(request))  # ValueError: a bad plan, nothing changed
        step_ns = time.perf_counter_ns() - start
        forward_ns = self.model.last_forward_ns if request.requests else 0
        return generate_pb2.StepResponse(
            # every rank runs the step; only rank 0 reports it
            generations=pb_convert.generations_to_pb(generations) if self.rank == 0 else [],
            forward_ns=forward_ns,
            decode_ns=max(step_ns - forward_ns, 0),
            total_ns=time.perf_counter_ns() - start,
        )


def serve(
    model: FlashCausalLM,
    model_id: str,
    uds_path: str | Path,
    memory_fraction: float,
    rank: int = 0,
    world_size: int = 1,
    max_workers: int = 8,
) -> int:
    """Serve until SIGTERM/SIGINT (returns 0) or an internal error (returns 1); the socket is removed."""
    socket_path = Path(f"{uds_path}-{rank}")
    if len(str(socket_path)) > UNIX_PATH_MAX:
        raise ValueError(f"unix socket path {socket_path} is longer than {UNIX_PATH_MAX} characters")
    try:
        claim_unix_socket(socket_path, "shard socket")  # a stale file goes; a live server's socket stays
    except SocketInUse as error:
        raise ValueError(str(error)) from None

    stop = threading.Event()
    policy = ErrorPolicy(on_fatal=stop.set)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="shard"),
        interceptors=[policy],
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
    )
    servicer = TextGenerationService(model, model_id, memory_fraction, uds_path, rank, world_size)
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(servicer, server)
    url = uds_url(uds_path, rank)
    server.add_insecure_port(url)

    def on_signal(signum, frame):
        logger.info(f"received {signal.Signals(signum).name}, stopping")
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    server.start()
    logger.info(
        f"shard {rank}/{world_size} ready on {url}: {model.config.architecture} {model.dtype} "
        f"on {model.device}, "
        f"pid {os.getpid()}"
    )
    try:
        servicer.model_thread.run_until(stop)
    finally:
        server.stop(grace=5).wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if socket_path.exists():
            socket_path.unlink()
    if policy.fatal.is_set():
        logger.error("shard stopped after an internal error")
        return 1
    logger.info("shard stopped")
    return 0
