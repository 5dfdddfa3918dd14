"""The gRPC shard: a real `text-generation-server serve` process driven through the generated stubs.

Everything it answers is compared with the engine run in this process (`models.local.generate`) on the same
checkpoint and requests. The router's side of the protocol is played here by `Driver`, a minimal planner
that owns the KV blocks (`BlockAllocator`), sends each request's blocks only once a step writes into them,
and checks every StepResponse against what the contract says the step must produce.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket as socket_module
import subprocess
import sys
import time
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
import torch
from text_generation_server.models import get_model
from text_generation_server.models.local import LocalResult, generate
from text_generation_server.models.types import (
    FinishReason,
    NewRequest,
    SamplingParameters,
    StoppingParameters,
    Tokens,
)
from text_generation_common.pb import generate_pb2 as pb
from text_generation_common.pb import generate_pb2_grpc
from text_generation_common.sockets import free_port

KV_FRACTION = 0.002  # of MemAvailable: a few thousand blocks of the tiny model, allocated in milliseconds
BLOCK_SIZE = 16
NUM_BLOCKS = 512  # what the requests of these tests are drawn from (must be within the server's capacity)
VOCAB = 1000
WARMUP = dict(max_input_tokens=32, max_prefill_tokens=64, max_total_tokens=64)
LOGPROB_TOL = 1e-5

_BIN = Path(sys.executable).parent / "text-generation-server"
CLI = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "text_generation_server.cli"]


# ----- process and client helpers --------------------------------------------------------------------------


class Shard:
    def __init__(self, process: subprocess.Popen, socket: Path, log: Path):
        self.process, self.socket, self.log = process, socket, log
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.stub = generate_pb2_grpc.TextGenerationServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def start_shard(
    model_dir: Path | str, directory: Path, *extra: str, env: dict | None = None, timeout: float = 60.0
):
    uds = directory / "shard"
    log = directory / "shard.log"
    env = dict(env or os.environ, OMP_NUM_THREADS="1")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                *CLI,
                "serve",
                str(model_dir),
                "--uds-path",
                str(uds),
                "--dtype",
                "float32",
                "--device",
                "cpu",
                "--kv-cache-fraction",
                str(KV_FRACTION),
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    socket = Path(f"{uds}-0")
    deadline = time.monotonic() + timeout
    while not socket.exists():
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no socket after {timeout}s:\n{log.read_text()}")
        time.sleep(0.05)
    shard = Shard(process, socket, log)
    grpc.channel_ready_future(shard.channel).result(timeout=10)
    return shard


def rpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value


class BlockAllocator:
    """Hands out KV blocks the way the router does: a free list, blocks returned when a request ends."""

    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE):
        self.block_size = block_size
        # odd blocks first, from the top: a request's blocks are deliberately neither contiguous nor ascending
        self.free = [*range(0, num_blocks, 2), *range(1, num_blocks, 2)]

    def allocate(self, count: int) -> list[int]:
        assert count <= len(self.free), "test allocator ran out of blocks"
        return [self.free.pop() for _ in range(count)]

    def release(self, blocks) -> None:
        self.free.extend(blocks)


def new_request(
    token_ids,
    max_new_tokens: int = 6,
    ignore_eos: bool = True,
    parameters: SamplingParameters = SamplingParameters(),
    stop_token_ids: tuple[int, ...] = (),
    **kwargs,
) -> NewRequest:
    """An engine request for a prompt (greedy and ignoring EOS unless told otherwise)."""
    stopping = StoppingParameters(
        max_new_tokens=max_new_tokens, ignore_eos_token=ignore_eos, stop_token_ids=tuple(stop_token_ids)
    )
    return NewRequest(
        token_ids=tuple(token_ids),
        prompt_length=len(token_ids),
        parameters=parameters,
        stopping=stopping,
        **kwargs,
    )


def new_request_pb(new: NewRequest) -> pb.NewRequest:
    """Written field by field here, independently of the servicer's own conversion (pb_convert)."""
    p, s = new.parameters, new.stopping
    return pb.NewRequest(
        token_ids=new.token_ids,
        prompt_length=new.prompt_length,
        num_cached_tokens=new.num_cached_tokens,
        parameters=pb.NextTokenChooserParameters(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            typical_p=p.typical_p,
            do_sample=p.do_sample,
            seed=p.seed,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
        ),
        stopping_parameters=pb.StoppingCriteriaParameters(
            max_new_tokens=s.max_new_tokens,
            ignore_eos_token=s.ignore_eos_token,
            stop_token_ids=s.stop_token_ids,
        ),
        prefill_logprobs=new.prefill_logprobs,
        top_n_tokens=new.top_n_tokens,
        omit_token_logprobs=not new.token_logprobs,
    )


def scheduled_pb(rid: int, num_tokens: int, blocks=(), new: NewRequest | None = None) -> pb.ScheduledRequest:
    message = pb.ScheduledRequest(id=rid, num_tokens=num_tokens, new_blocks=list(blocks))
    if new is not None:
        message.new_request.CopyFrom(new_request_pb(new))
    return message


def blocks_for(positions: int) -> int:
    return math.ceil(positions / BLOCK_SIZE)


@dataclass(eq=False)
class Tracked:
    """One request the driver runs: what it sent the shard and what came back."""

    new: NewRequest  # what its (next) first step carries
    blocks: list[int]  # reserved for its whole life; sent one by one as steps reach them
    computed: int  # tokens the shard has computed
    known: int  # tokens the shard knows (prompt + generated)
    result: LocalResult
    sent_blocks: int = 0
    held: bool = False  # the shard holds it (its new_request was sent)


@dataclass(frozen=True)
class Planned:
    rid: int
    num_tokens: int
    new_blocks: tuple[int, ...]
    new: NewRequest | None

    def to_pb(self) -> pb.ScheduledRequest:
        return scheduled_pb(self.rid, self.num_tokens, self.new_blocks, self.new)


class Driver:
    """A minimal router: every step schedules every request it runs (`chunk_size` prompt tokens of those still
    prefilling, one of those decoding), appending to each block table just the blocks the step writes into.

    Every Step goes to every stub at once (the ranks of a sharded model); the answer of rank 0 is checked
    against the contract (who reports, with what) and recorded; the other ranks must answer with none.
    """

    def __init__(self, stubs, allocator: BlockAllocator, chunk_size: int | None = None):
        self.stubs = list(stubs) if isinstance(stubs, (list, tuple)) else [stubs]
        self.allocator = allocator
        self.chunk_size = chunk_size
        self.running: dict[int, Tracked] = {}
        self.results: dict[int, LocalResult] = {}
        self.to_release: list[int] = []
        self.steps: list[pb.StepRequest] = []
        self._pool = futures.ThreadPoolExecutor(len(self.stubs)) if len(self.stubs) > 1 else None

    def add(self, rid: int, new: NewRequest, blocks: list[int] | None = None) -> None:
        assert rid not in self.running
        if blocks is None:
            positions = max(new.prompt_length + new.stopping.max_new_tokens - 1, len(new.token_ids))
            blocks = self.allocator.allocate(blocks_for(positions))
        result = LocalResult()
        self.running[rid] = Tracked(new, blocks, new.num_cached_tokens, len(new.token_ids), result)
        self.results[rid] = result

    def release(self, rid: int) -> None:
        """Forget `rid` (cancelled, or stopped by the router): listed in the next step's `released`."""
        tracked = self.running.pop(rid)
        self.allocator.release(tracked.blocks)
        self.to_release.append(rid)

    def preempt(self, rid: int) -> None:
        """Release `rid` and resend it whole in the same step: its prompt and every token it generated."""
        tracked = self.running[rid]
        prompt = tracked.new.token_ids[: tracked.new.prompt_length]
        recomputed = replace(
            tracked.new,
            token_ids=(*prompt, *tracked.result.token_ids),
            num_cached_tokens=0,
            prefill_logprobs=False,  # the router has them already
        )
        self.to_release.append(rid)
        self.running[rid] = Tracked(recomputed, tracked.blocks, 0, len(recomputed.token_ids), tracked.result)

    def plan(self, ids=None) -> list[Planned]:
        """The next step of `ids` (default: every running request); changes nothing."""
        planned = []
        for rid in self.running if ids is None else ids:
            t = self.running[rid]
            remaining = t.known - t.computed
            n = remaining if self.chunk_size is None or remaining == 1 else min(remaining, self.chunk_size)
            needed = blocks_for(t.computed + n)
            planned.append(
                Planned(rid, n, tuple(t.blocks[t.sent_blocks : needed]), None if t.held else t.new)
            )
        return planned

    def call(self, method: str, message):
        if self._pool is None:
            return [getattr(self.stubs[0], method)(message, timeout=60)]
        return list(self._pool.map(lambda stub: getattr(stub, method)(message, timeout=60), self.stubs))

    def step(self, planned: list[Planned] | None = None) -> pb.StepResponse:
        planned = self.plan() if planned is None else planned
        request = pb.StepRequest(released=self.to_release, requests=[p.to_pb() for p in planned])
        answers = self.call("Step", request)
        for other in answers[1:]:
            assert list(other.generations) == [], "only rank 0 reports generations"
        self.steps.append(request)
        self.to_release = []
        self._record(planned, answers[0])
        return answers[0]

    def _record(self, planned: list[Planned], response: pb.StepResponse) -> None:
        assert response.total_ns > 0
        expected, samples, prefills = [], {}, {}
        for p in planned:
            t = self.running[p.rid]
            t.held = True
            t.sent_blocks += len(p.new_blocks)
            samples[p.rid] = t.computed + p.num_tokens == t.known
            prefills[p.rid] = t.new.prefill_logprobs and t.computed < t.new.prompt_length
            t.computed += p.num_tokens
            if samples[p.rid] or prefills[p.rid]:
                expected.append(p.rid)
        # one generation per request that chose a token or computed prompt logprobs, in the step's order
        assert [g.request_id for g in response.generations] == expected
        for g in response.generations:
            t = self.running[g.request_id]
            result = t.result
            assert g.HasField("prefill_tokens") == prefills[g.request_id], g
            if prefills[g.request_id]:
                result.prefill.ids.extend(g.prefill_tokens.ids)
                result.prefill.logprobs.extend(g.prefill_tokens.logprobs)
            assert g.HasField("token_id") == samples[g.request_id], g
            if not samples[g.request_id]:
                assert not g.HasField("finish_reason") and not g.HasField("top_tokens"), g
                continue
            assert 0 <= g.token_id < VOCAB
            result.token_ids.append(g.token_id)
            result.logprobs.append(g.logprob)
            t.known += 1
            if t.new.top_n_tokens:
                assert len(g.top_tokens.ids) == len(g.top_tokens.logprobs) == t.new.top_n_tokens
                result.top_tokens.append(Tokens(list(g.top_tokens.ids), list(g.top_tokens.logprobs)))
            else:
                assert not g.HasField("top_tokens") or not g.top_tokens.ids, g
            if g.HasField("finish_reason"):
                result.finish_reason = FinishReason(g.finish_reason)
                self.allocator.release(self.running.pop(g.request_id).blocks)

    def run(self, max_steps: int = 200) -> dict[int, LocalResult]:
        """Step until every request finished."""
        for _ in range(max_steps):
            if not self.running:
                return self.results
            self.step()
        raise AssertionError(f"requests {sorted(self.running)} still running after {max_steps} steps")


def close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=0, abs_tol=LOGPROB_TOL)


def assert_same(served: LocalResult, want: LocalResult, name) -> None:
    """Same tokens, top tokens, prompt tokens and finish reason; logprobs within LOGPROB_TOL."""
    assert served.token_ids == want.token_ids, name
    assert served.finish_reason == want.finish_reason, name
    assert len(served.logprobs) == len(want.logprobs), name
    assert all(close(a, b) for a, b in zip(served.logprobs, want.logprobs)), (
        name, served.logprobs, want.logprobs
    )
    assert [t.ids for t in served.top_tokens] == [t.ids for t in want.top_tokens], name
    for got, expected in zip(served.top_tokens, want.top_tokens):
        assert all(close(a, b) for a, b in zip(got.logprobs, expected.logprobs)), name
    assert served.prefill.ids == want.prefill.ids, name
    assert len(served.prefill.logprobs) == len(want.prefill.logprobs), name
    assert all(close(a, b) for a, b in zip(served.prefill.logprobs, want.prefill.logprobs)), name


def assert_all_same(served: dict[int, LocalResult], requests: dict[int, NewRequest], engine) -> None:
    """`served` equals each request of `requests` run to completion in the in-process engine, unchunked."""
    ids = sorted(requests)
    expected = generate(engine, [requests[rid] for rid in ids])
    for rid, want in zip(ids, expected):
        assert want.finish_reason is not None
        assert_same(served[rid], want, f"request {rid}")


SAMPLED = SamplingParameters(do_sample=True, temperature=0.75, top_k=20, seed=1234)  # exact in float32


def some_requests(first_id: int, count: int, seed: int = 0, max_new_tokens: int = 6) -> dict[int, NewRequest]:
    """Prompts of 2..35 tokens (some cross a block boundary), greedy and sampled in turn."""
    g = torch.Generator().manual_seed(seed)
    requests = {}
    for i in range(count):
        length = int(torch.randint(2, 36, (1,), generator=g))
        prompt = torch.randint(3, 990, (length,), generator=g).tolist()
        params = replace(SAMPLED, seed=1234 + i) if i % 2 else SamplingParameters()
        requests[first_id + i] = new_request(prompt, max_new_tokens=max_new_tokens + i, parameters=params)
    return requests


# ----- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard(tiny_internlm2_dir, tmp_path_factory):
    started = start_shard(tiny_internlm2_dir, tmp_path_factory.mktemp("shard"))
    yield started
    started.close()


@pytest.fixture(scope="module")
def warmup(shard) -> pb.WarmupResponse:
    return shard.stub.Warmup(pb.WarmupRequest(**WARMUP))


@pytest.fixture
def stub(shard, warmup):
    yield shard.stub
    assert shard.process.poll() is None, f"the shard died:\n{shard.log.read_text()}"
    shard.stub.ClearCache(pb.ClearCacheRequest())


@pytest.fixture(scope="module")
def engine(tiny_internlm2_dir):
    model = get_model(tiny_internlm2_dir, dtype="float32", device="cpu")
    model.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    return model


@pytest.fixture
def allocator(warmup) -> BlockAllocator:
    assert warmup.num_blocks >= NUM_BLOCKS
    return BlockAllocator(NUM_BLOCKS, BLOCK_SIZE)


# ----- tests ------------------------------------------------------------------------------------------------


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no MemAvailable in /proc/meminfo")


def test_warmup_sizes_the_cache_from_the_configured_fraction(warmup, tiny_internlm2_dir):
    config = json.loads((tiny_internlm2_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    bytes_per_token = (
        2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4
    )  # float32
    expected_blocks = mem_available() * KV_FRACTION / (bytes_per_token * BLOCK_SIZE)
    assert warmup.block_size == BLOCK_SIZE
    assert expected_blocks / 3 <= warmup.num_blocks <= expected_blocks * 3
    assert warmup.max_supported_total_tokens == warmup.num_blocks * warmup.block_size


def test_info_health_and_service_discovery(shard, warmup, tiny_internlm2_dir):
    info = shard.stub.Info(pb.InfoRequest())
    assert info.model_id == str(tiny_internlm2_dir.resolve())
    assert info.architecture == "InternLM2ForCausalLM"
    assert (info.dtype, info.device_type) == ("torch.float32", "cpu")
    assert (info.block_size, info.world_size, info.vocab_size) == (BLOCK_SIZE, 1, VOCAB)
    assert info.max_position_embeddings == 512
    assert sorted(info.eos_token_ids) == [2, 998]
    assert set(info.features) == {"top_n_tokens", "prefill_logprobs", "chunked_prefill", "grammar"}
    assert info.dynamic_rope is False  # the tiny checkpoint has no rope_scaling
    assert info.kernels == "reference"
    assert shard.stub.Health(pb.HealthRequest()) == pb.HealthResponse()
    urls = shard.stub.ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls
    assert list(urls) == [f"unix://{shard.socket}"]


def test_dynamic_rope_is_reported(tmp_path_factory, tmp_path):
    from conftest import make_tiny

    model_dir = make_tiny(
        tmp_path_factory, "server-dynamic", hidden=64, layers=1, heads=4, kv_heads=2, intermediate=128,
        vocab=1000, max_pos=64, rope_scaling={"type": "dynamic", "factor": 2.0},
    )
    shard = start_shard(model_dir, tmp_path)
    try:
        info = shard.stub.Info(pb.InfoRequest())
        assert info.dynamic_rope is True and info.max_position_embeddings == 64
    finally:
        shard.close()


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_steps_match_the_engine(stub, engine, allocator, chunk_size):
    """A ragged batch of greedy and sampled requests, some joining later, one asking prompt logprobs and top
    tokens, one ended by a stop token id: the served tokens are the in-process engine's, unchunked, also when
    the prompts are sent in chunks of 5 tokens over several steps."""
    requests = some_requests(1, 5)
    requests[6] = new_request(
        [7, 8, 9, *range(100, 120)], max_new_tokens=3, prefill_logprobs=True, top_n_tokens=3
    )
    eos_prompt = [41, 42, 43, 44]
    greedy = generate(engine, [new_request(eos_prompt, max_new_tokens=8)])[0].token_ids
    requests[7] = new_request(eos_prompt, max_new_tokens=8, ignore_eos=False, stop_token_ids=(greedy[2],))
    late = some_requests(8, 2, seed=9)

    driver = Driver(stub, allocator, chunk_size)
    for rid in (1, 2, 3, 4, 5, 6, 7):
        driver.add(rid, requests[rid])
    first = driver.step()
    assert first.total_ns >= first.forward_ns > 0
    # the first step of a request carries it whole, with the blocks its chunk writes into
    sent = {s.id: s for s in driver.steps[0].requests}
    assert all(s.HasField("new_request") for s in sent.values())
    assert list(sent[6].new_blocks) == driver.running[6].blocks[: 1 if chunk_size else 2]
    if chunk_size is None:
        assert {g.request_id for g in first.generations} == set(range(1, 8))
        prefill = {g.request_id: g for g in first.generations}[6].prefill_tokens
        assert list(prefill.ids) == list(requests[6].token_ids) and math.isnan(prefill.logprobs[0])
    else:
        # chunks that do not end their prompt choose no token; only request 6 reports its prompt logprobs then
        partial = {g.request_id for g in first.generations if not g.HasField("token_id")}
        assert 6 in partial and all(len(requests[rid].token_ids) > 5 for rid in partial)
    driver.step()
    for rid, new in late.items():  # joining a batch that is already decoding
        driver.add(rid, new)
    driver.run()
    assert driver.results[7].finish_reason == FinishReason.EOS_TOKEN
    assert driver.results[7].token_ids[-1] == greedy[2] and len(driver.results[7].token_ids) <= 3
    assert_all_same(driver.results, {**requests, **late}, engine)
    # a request the shard reported finished is forgotten
    error = rpc_error(stub.Step, pb.StepRequest(released=[7]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "7" in error.details()
    empty = stub.Step(pb.StepRequest())
    assert list(empty.generations) == [] and empty.forward_ns == 0


def test_a_pipelined_step_skips_what_the_step_before_finished(stub):
    """A router plans step k + 1 before it has k's results: a request that ended in step k (here by its length)
    may still be scheduled or released in k + 1. The shard skips both there, and only there; the request
    planned with it runs as if alone."""
    ended = new_request([5, 6, 7], max_new_tokens=1)
    other = new_request([8, 9, 10, 11], max_new_tokens=2)
    first = stub.Step(pb.StepRequest(step_id=1, requests=[
        scheduled_pb(1, 3, [0], ended), scheduled_pb(2, 4, [1], other), scheduled_pb(3, 3, [2], ended),
    ]))
    assert {g.request_id: g.HasField("finish_reason") for g in first.generations} == {1: True, 2: False, 3: True}
    second = stub.Step(pb.StepRequest(step_id=2, released=[3], requests=[scheduled_pb(1, 1), scheduled_pb(2, 1)]))
    assert [g.request_id for g in second.generations] == [2] and second.generations[0].HasField("finish_reason")
    # a step later they are unknown again, as they are at once to a step that is not pipelined
    error = rpc_error(stub.Step, pb.StepRequest(step_id=3, released=[1]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "1" in error.details()
    again = stub.Step(pb.StepRequest(requests=[scheduled_pb(4, 3, [0], ended)]))
    assert again.generations[0].HasField("finish_reason")
    error = rpc_error(stub.Step, pb.StepRequest(released=[4]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "4" in error.details()


def test_numbered_steps_run_in_order_and_a_lost_one_is_not_waited_for_long(stub):
    """Step 2 sent before step 1 still runs after it (it decodes the request step 1 brings); a step whose
    predecessor never comes runs after a short wait, refused if it refers to what never ran; steps behind a lost
    one keep their order."""
    request = new_request([5, 6, 7, 8], max_new_tokens=4)
    with futures.ThreadPoolExecutor(2) as pool:
        second = pool.submit(stub.Step, pb.StepRequest(step_id=2, requests=[scheduled_pb(1, 1)]))
        time.sleep(0.3)
        assert not second.done()
        first = stub.Step(pb.StepRequest(step_id=1, requests=[scheduled_pb(1, 4, [0], request)]))
        assert first.generations[0].HasField("token_id")
        assert second.result(timeout=30).generations[0].HasField("token_id")
    start = time.monotonic()
    error = rpc_error(stub.Step, pb.StepRequest(step_id=9, requests=[scheduled_pb(7, 1)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "7" in error.details()
    assert 1.0 < time.monotonic() - start < 20
    # two steps behind lost ones (10 and 11), the later one sent first: each waits its own while, yet 12, which
    # brings the request, still goes before 13, which decodes it
    later = new_request([9, 10, 11], max_new_tokens=4)
    with futures.ThreadPoolExecutor(2) as pool:
        thirteenth = pool.submit(stub.Step, pb.StepRequest(step_id=13, requests=[scheduled_pb(8, 1)]))
        time.sleep(0.3)
        twelfth = pool.submit(stub.Step, pb.StepRequest(step_id=12, requests=[scheduled_pb(8, 3, [1], later)]))
        assert twelfth.result(timeout=30).generations[0].HasField("token_id")
        assert thirteenth.result(timeout=30).generations[0].HasField("token_id")


def test_release_removes_a_request_and_the_others_continue(stub, engine, allocator):
    requests = some_requests(10, 3, seed=1, max_new_tokens=5)
    driver = Driver(stub, allocator)
    for rid, new in requests.items():
        driver.add(rid, new)
    driver.step()
    driver.step()
    driver.release(11)  # cancelled after its second token
    response = driver.step()
    assert list(driver.steps[-1].released) == [11]
    assert [g.request_id for g in response.generations] == [10, 12]
    driver.run()
    assert len(driver.results[11].token_ids) == 2
    expected = dict(zip(requests, generate(engine, list(requests.values()))))
    for rid in (10, 12):
        assert_same(driver.results[rid], expected[rid], f"request {rid}")
    assert driver.results[11].token_ids == expected[11].token_ids[:2]
    # the shard forgot it: scheduling or releasing it again is refused, naming it
    error = rpc_error(stub.Step, pb.StepRequest(requests=[scheduled_pb(11, 1)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "11" in error.details()
    error = rpc_error(stub.Step, pb.StepRequest(released=[11]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "11" in error.details()

    # releasing every request it holds leaves an empty shard that still serves
    more = some_requests(20, 2, seed=2)
    driver = Driver(stub, allocator)
    for rid, new in more.items():
        driver.add(rid, new)
    driver.step()
    driver.release(20)
    driver.release(21)
    response = driver.step()
    assert list(response.generations) == [] and response.forward_ns == 0
    assert rpc_error(stub.Step, pb.StepRequest(released=[20])).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_preempted_request_resent_whole_continues_its_tokens(stub, engine, allocator):
    """Released and sent again in the same step with the tokens it had generated (recomputed in chunks): a
    greedy and a sampled request go on exactly as if nothing had happened."""
    requests = some_requests(30, 2, seed=3, max_new_tokens=7)
    driver = Driver(stub, allocator, chunk_size=5)
    for rid, new in requests.items():
        driver.add(rid, new)
    while min(len(driver.results[rid].token_ids) for rid in requests) < 3:
        driver.step()
    for rid in requests:
        driver.preempt(rid)
    planned = driver.plan()
    assert all(p.new is not None and p.new.prompt_length < len(p.new.token_ids) for p in planned)
    driver.step(planned)
    assert sorted(driver.steps[-1].released) == sorted(requests)
    driver.run()
    assert_all_same(driver.results, requests, engine)


def test_clear_cache_forgets_every_request(stub, engine, allocator):
    requests = some_requests(50, 2, seed=4)
    driver = Driver(stub, allocator, chunk_size=5)
    for rid, new in requests.items():
        driver.add(rid, new)
    driver.step()
    assert stub.ClearCache(pb.ClearCacheRequest()) == pb.ClearCacheResponse()
    for rid in requests:
        error = rpc_error(stub.Step, pb.StepRequest(requests=[scheduled_pb(rid, 1)]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and str(rid) in error.details()
        error = rpc_error(stub.Step, pb.StepRequest(released=[rid]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and str(rid) in error.details()
    # the same ids are new again
    driver = Driver(stub, allocator, chunk_size=5)
    for rid, new in requests.items():
        driver.add(rid, new)
    driver.run()
    assert_all_same(driver.results, requests, engine)


def test_bad_plans_are_refused_change_nothing_and_the_shard_keeps_serving(stub, engine, allocator, warmup):
    a = new_request(list(range(200, 208)), max_new_tokens=6)  # decoding by now
    b = new_request(list(range(300, 323)), max_new_tokens=4, parameters=SAMPLED, prefill_logprobs=True)
    c = new_request([11, 12, 13], max_new_tokens=3, top_n_tokens=2)  # a valid new request in most bad plans
    driver = Driver(stub, allocator, chunk_size=7)
    driver.add(101, a)
    driver.add(202, b)
    driver.step()
    driver.step()
    good = driver.plan()  # a: decode position 8; b: positions 14..20, appending its second block
    assert [(p.rid, p.num_tokens, len(p.new_blocks)) for p in good] == [(101, 1, 0), (202, 7, 1)]
    a_step, b_step = (p.to_pb() for p in good)
    c_blocks = allocator.allocate(1)
    c_step = scheduled_pb(303, 3, c_blocks, c)

    def new(rid, request, num_tokens=None, blocks=None):
        return scheduled_pb(
            rid, len(request.token_ids) if num_tokens is None else num_tokens,
            c_blocks if blocks is None else blocks, request,
        )

    def with_params(**params):
        return replace(c, parameters=replace(SamplingParameters(), **params))

    long_prompt = new_request(list(range(400, 420)), max_new_tokens=2)
    nowhere = warmup.num_blocks  # the first block past the cache
    bad_plans = [
        ("unknown id", [], [a_step, b_step, scheduled_pb(999, 1)], ["999", "not held"]),
        ("new request already held", [], [b_step, new(101, c)], ["101", "already holds"]),
        ("num_tokens 0", [], [scheduled_pb(101, 0), b_step, c_step], ["num_tokens 0"]),
        ("num_tokens past the known tokens (decoding)", [], [scheduled_pb(101, 2), b_step], ["num_tokens 2"]),
        ("num_tokens past a new prompt", [], [a_step, new(303, c, num_tokens=4)], ["num_tokens 4"]),
        ("block out of range", [], [c_step, scheduled_pb(101, 1, [nowhere]), b_step], [str(nowhere)]),
        ("block out of range (new)", [], [a_step, new(303, c, blocks=[10**6])], ["1000000"]),
        ("blocks short of the positions", [], [a_step, scheduled_pb(202, 7), c_step], ["position 20"]),
        ("blocks short of a new prompt", [], [a_step, b_step, new(404, long_prompt)], ["position 19"]),
        ("token id outside the vocabulary", [], [a_step, new(303, replace(c, token_ids=(11, VOCAB, 13)))],
         [str(VOCAB)]),
        ("top_p above 1", [], [a_step, b_step, new(303, with_params(top_p=1.5))], ["top_p", "1.5"]),
        ("negative temperature", [], [a_step, new(303, with_params(temperature=-2.0, do_sample=True))],
         ["temperature", "-2"]),
        ("infinite frequency penalty", [], [new(303, with_params(frequency_penalty=math.inf))],
         ["frequency_penalty", "inf"]),
        ("max_new_tokens 0", [], [a_step, new(303, replace(c, stopping=StoppingParameters(0)))],
         ["max_new_tokens", "got 0"]),
        ("no tokens to compute", [], [new(303, replace(c, num_cached_tokens=3))], ["num_cached_tokens 3"]),
        ("prompt_length 0", [], [new(303, replace(c, prompt_length=0))], ["prompt_length 0"]),
        ("releasing an unknown id", [4242], [a_step, b_step], ["4242"]),
        ("releasing an id twice", [202, 202], [a_step], ["twice", "202"]),
        ("an id twice in a step", [], [a_step, b_step, scheduled_pb(101, 1)], ["twice", "101"]),
        ("a released id scheduled as held", [101], [b_step, scheduled_pb(101, 1)], ["101", "not held"]),
        ("a good step with a released request and a bad one", [101], [b_step, c_step, scheduled_pb(999, 1)],
         ["999"]),
    ]
    for name, released, requests, needles in bad_plans:
        error = rpc_error(stub.Step, pb.StepRequest(released=released, requests=requests))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.code(), error.details())
        for needle in needles:
            assert needle in error.details(), (name, needle, error.details())
    assert stub.Health(pb.HealthRequest()) == pb.HealthResponse()
    # b's block table did not grow: the step that needs its second block is still refused
    error = rpc_error(stub.Step, pb.StepRequest(requests=[a_step, scheduled_pb(202, 7)]))
    assert "position 20" in error.details()
    # every request is where it was: a and b continue (nothing released, nothing computed), c is still new
    allocator.release(c_blocks)
    driver.add(303, c)
    driver.run()
    assert_all_same(driver.results, {101: a, 202: b, 303: c}, engine)


def test_step_before_warmup_then_sigterm(tiny_internlm2_dir, tmp_path):
    shard = start_shard(tiny_internlm2_dir, tmp_path)
    try:
        step = pb.StepRequest(requests=[scheduled_pb(1, 2, [0], new_request([5, 6], max_new_tokens=2))])
        error = rpc_error(shard.stub.Step, step)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "Warmup" in error.details()
        error = rpc_error(shard.stub.Step, pb.StepRequest())
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        shard.stub.Health(pb.HealthRequest())
        assert shard.stub.Info(pb.InfoRequest()).block_size == BLOCK_SIZE
        # refused warmups leave it unwarmed and serving
        for limits, needle in (
            (dict(max_input_tokens=8, max_prefill_tokens=8, max_total_tokens=8), "max_total_tokens (8)"),
            (dict(max_input_tokens=8, max_prefill_tokens=8, max_total_tokens=10**9), "tokens 1000000000"),
        ):
            error = rpc_error(shard.stub.Warmup, pb.WarmupRequest(**limits))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert needle in error.details(), error.details()
            assert rpc_error(shard.stub.Step, step).code() == grpc.StatusCode.FAILED_PRECONDITION
        assert shard.stub.Warmup(pb.WarmupRequest(**WARMUP)).num_blocks > 0
        generations = shard.stub.Step(step).generations
        assert [g.request_id for g in generations] == [1] and generations[0].HasField("token_id")
        shard.process.send_signal(signal.SIGTERM)
        assert shard.process.wait(20) == 0, shard.log.read_text()
        assert not shard.socket.exists()
        assert "ready" in shard.log.read_text()
    finally:
        shard.close()


def test_serve_a_cached_hub_id_over_a_stale_socket_with_json_logs(tiny_internlm2_dir, tmp_path):
    snapshot = fake_hub_cache(tmp_path / "hub", "internlm/tiny-serve", tiny_internlm2_dir)
    (tmp_path / "shard-0").write_text("stale")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"))  # serve reads the cache only, even online
    shard = start_shard("internlm/tiny-serve", tmp_path, "--json-output", env=env)
    try:
        assert shard.stub.Info(pb.InfoRequest()).model_id == str(snapshot)
        shard.stub.Health(pb.HealthRequest())
        shard.process.send_signal(signal.SIGINT)
        assert shard.process.wait(20) == 0
        records = [json.loads(line) for line in shard.log.read_text().splitlines() if line.strip()]
        assert any("ready" in record["record"]["message"] for record in records)
    finally:
        shard.close()


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env=env)


def test_serve_refuses_a_missing_model_dir(tmp_path):
    result = run_cli("serve", str(tmp_path / "nowhere"), "--uds-path", str(tmp_path / "s"), "--device", "cpu")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "nowhere" in errors[0] and "ERROR" in errors[0], result.stderr
    assert not (tmp_path / "s-0").exists()


def test_sharded_ranks_step_together_and_only_rank_0_reports(tiny_internlm2_dir, tmp_path, engine):
    """Two CPU ranks (gloo): every call goes to both at once, as the router sends it."""
    port = str(free_port())
    shards = []
    try:
        for rank in (0, 1):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            directory = tmp_path / f"rank{rank}"
            directory.mkdir()
            uds = tmp_path / "tp"
            log = directory / "shard.log"
            with open(log, "wb") as out:
                process = subprocess.Popen(
                    [
                        *CLI,
                        "serve",
                        str(tiny_internlm2_dir),
                        "--sharded",
                        "--uds-path",
                        str(uds),
                        "--device",
                        "cpu",
                        "--kv-cache-fraction",
                        str(KV_FRACTION),
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=dict(env, OMP_NUM_THREADS="1"),
                )
            shards.append(Shard(process, Path(f"{uds}-{rank}"), log))
        deadline = time.monotonic() + 60
        while not all(shard.socket.exists() for shard in shards):
            for shard in shards:
                assert shard.process.poll() is None, shard.log.read_text()
            assert time.monotonic() < deadline, [shard.log.read_text() for shard in shards]
            time.sleep(0.05)

        urls = shards[0].stub.ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls
        assert list(urls) == [f"unix://{shard.socket}" for shard in shards]
        assert shards[1].stub.Info(pb.InfoRequest()).world_size == 2
        driver = Driver([shard.stub for shard in shards], BlockAllocator(NUM_BLOCKS), chunk_size=5)
        capacity = min(w.num_blocks for w in driver.call("Warmup", pb.WarmupRequest(**WARMUP)))
        assert capacity >= NUM_BLOCKS
        driver.call("ClearCache", pb.ClearCacheRequest())
        requests = some_requests(1, 3, seed=5)
        for rid, new in requests.items():
            driver.add(rid, new)
        driver.step()
        driver.step()
        driver.release(2)
        driver.run()
        expected = dict(zip(requests, generate(engine, list(requests.values()))))
        for rid in (1, 3):
            assert driver.results[rid].token_ids == expected[rid].token_ids, f"request {rid}"
            assert driver.results[rid].finish_reason == expected[rid].finish_reason
            # two partial sums all-reduced: not bit-identical to one rank
            pairs = zip(driver.results[rid].logprobs, expected[rid].logprobs)
            assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in pairs)
        assert driver.results[2].token_ids == expected[2].token_ids[: len(driver.results[2].token_ids)]
        for shard in shards:
            shard.process.send_signal(signal.SIGTERM)
        for shard in shards:
            assert shard.process.wait(30) == 0, shard.log.read_text()
            assert not shard.socket.exists()
    finally:
        for shard in shards:
            shard.close()


def test_serve_refuses_sharded_without_its_environment(tmp_path, tiny_internlm2_dir):
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    result = run_cli(
        "serve", str(tiny_internlm2_dir), "--sharded", "--uds-path", str(tmp_path / "s"), env=env
    )
    assert result.returncode == 1 and "MASTER_ADDR" in result.stderr


# ----- the error policy, in process ----------------------------------------------------------------------


def test_unexpected_errors_are_internal_and_stop_the_shard(tmp_path):
    from text_generation_server.server import ErrorPolicy, FailedPrecondition, ShardError

    stopped = []

    class Broken(generate_pb2_grpc.TextGenerationServiceServicer):
        def Health(self, request, context):
            raise RuntimeError("device lost")

        def Info(self, request, context):
            raise FailedPrecondition("not warmed up")

        def ServiceDiscovery(self, request, context):
            raise ShardError("refused")

        def ClearCache(self, request, context):
            raise ValueError("bad id")

    policy = ErrorPolicy(on_fatal=lambda: stopped.append(True))
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[policy])
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(Broken(), server)
    server.add_insecure_port(f"unix://{tmp_path}/policy")
    server.start()
    try:
        with grpc.insecure_channel(f"unix://{tmp_path}/policy") as channel:
            stub = generate_pb2_grpc.TextGenerationServiceStub(channel)
            error = rpc_error(stub.Info, pb.InfoRequest())
            assert (error.code(), error.details()) == (grpc.StatusCode.FAILED_PRECONDITION, "not warmed up")
            error = rpc_error(stub.ServiceDiscovery, pb.ServiceDiscoveryRequest())
            assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "refused")
            error = rpc_error(stub.ClearCache, pb.ClearCacheRequest())
            assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "bad id")
            assert not stopped
            error = rpc_error(stub.Health, pb.HealthRequest())
            assert error.code() == grpc.StatusCode.INTERNAL and "device lost" in error.details()
            assert stopped == [True]
            assert rpc_error(stub.Info, pb.InfoRequest()).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


# ----- download-weights -------------------------------------------------------------------------------------


def test_download_weights_converts_a_local_bin_checkpoint(tmp_path_factory):
    from conftest import make_tiny

    source = make_tiny(tmp_path_factory, "server-bin", format="bin", shards=1)
    model_dir = tmp_path_factory.mktemp("bin-copy") / "model"
    shutil.copytree(source, model_dir)
    result = run_cli("download-weights", str(model_dir))
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == model_dir.resolve()
    assert list(model_dir.glob("*.safetensors"))


def fake_hub_cache(root: Path, repo: str, model_dir: Path) -> Path:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<sha>/...}."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / sha
    shutil.copytree(model_dir, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(sha)
    return snapshot


def test_download_weights_resolves_a_cached_hub_id_offline(tmp_path, tiny_internlm2_dir):
    snapshot = fake_hub_cache(tmp_path / "hub", "internlm/tiny-test", tiny_internlm2_dir)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    result = run_cli("download-weights", "internlm/tiny-test", env=env)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == snapshot
    missing = run_cli("download-weights", "internlm/not-cached", env=env)
    assert missing.returncode == 1 and missing.stdout == ""
    errors = [line for line in missing.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "internlm/not-cached" in errors[0] and "HF_HUB_OFFLINE" in errors[0], (
        missing.stderr
    )


# ----- block tables ---------------------------------------------------------------------------------------


def test_block_tables_grow_through_new_blocks_across_steps(stub, allocator, engine):
    """A request given one block for its 16-token prompt: the decode step that writes position 16 is refused
    without a block and changes nothing; with the block appended it goes on and gives the engine's tokens. A
    chunked prompt receives its blocks one step at a time."""
    full = new_request(list(range(3, 3 + BLOCK_SIZE)), max_new_tokens=4)
    blocks = allocator.allocate(2)
    first = stub.Step(pb.StepRequest(requests=[scheduled_pb(90, BLOCK_SIZE, blocks[:1], full)]))
    tokens = [first.generations[0].token_id]
    error = rpc_error(stub.Step, pb.StepRequest(requests=[scheduled_pb(90, 1)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "position 16" in error.details()
    response = stub.Step(pb.StepRequest(requests=[scheduled_pb(90, 1, blocks[1:])]))
    tokens.append(response.generations[0].token_id)
    while not response.generations[0].HasField("finish_reason"):
        response = stub.Step(pb.StepRequest(requests=[scheduled_pb(90, 1)]))
        tokens.append(response.generations[0].token_id)
    assert tokens == generate(engine, [full])[0].token_ids

    chunked = new_request(list(range(500, 540)), max_new_tokens=3, prefill_logprobs=True)
    driver = Driver(stub, allocator, chunk_size=5)
    driver.add(91, chunked)
    reserved = list(driver.running[91].blocks)
    driver.run()
    # 40 prompt tokens in chunks of 5, then 2 decode steps: a block is appended by the steps writing 0, 16, 32
    appended = [list(s.requests[0].new_blocks) for s in driver.steps]
    assert [len(blocks) for blocks in appended] == [1, 0, 0, 1, 0, 0, 1, 0, 0, 0]
    assert sum(appended, []) == reserved and reserved == sorted(reserved, reverse=True)  # BlockAllocator
    assert_all_same(driver.results, {91: chunked}, engine)


def test_a_prefix_cache_hit_reuses_the_blocks_of_an_earlier_request(stub, allocator, engine):
    """num_cached_tokens: a request whose first block was written by another request computes only the rest of
    its prompt, and gives the tokens of the whole prompt computed from scratch."""
    shared = list(range(600, 600 + BLOCK_SIZE))
    first = new_request([*shared, 1, 2, 3, 4], max_new_tokens=2)
    driver = Driver(stub, allocator)
    driver.add(1, first)
    driver.run()
    prefix_block = driver.steps[0].requests[0].new_blocks[0]
    second = new_request([*shared, 700, 701, 702, 703, 704, 705], max_new_tokens=4, prefill_logprobs=False)
    cached = replace(second, num_cached_tokens=BLOCK_SIZE)
    driver = Driver(stub, allocator)
    driver.add(2, cached, blocks=[prefix_block, *allocator.allocate(1)])
    driver.run()
    assert driver.steps[0].requests[0].num_tokens == len(second.token_ids) - BLOCK_SIZE
    assert list(driver.steps[0].requests[0].new_blocks)[0] == prefix_block
    want = generate(engine, [second])[0]
    assert_same(driver.results[2], want, "request 2")


def test_serve_never_takes_over_a_live_socket(tiny_internlm2_dir, tmp_path):
    """A socket another process answers on is not a stale file: serve refuses it and leaves it in place."""
    path = tmp_path / "live-0"
    with socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        result = run_cli(
            "serve", str(tiny_internlm2_dir), "--uds-path", str(tmp_path / "live"), "--device", "cpu", "--dtype", "float32"
        )
        assert result.returncode == 1
        assert f"shard socket {path} is in use" in result.stderr, result.stderr
        assert path.exists()
