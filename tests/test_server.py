"""The gRPC shard: a real `text-generation-server serve` process driven through the generated stubs.

Everything it answers is compared with the engine run in this process on the same checkpoint and requests.
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
from pathlib import Path

import grpc
import pytest
import torch
from helpers import BlockAllocator, make_request
from text_generation_server.models import get_model
from text_generation_server.models.flash_causal_lm import FlashCausalLMBatch
from text_generation_server.models.types import Request, SamplingParameters
from text_generation_server.pb import generate_pb2 as pb
from text_generation_server.pb import generate_pb2_grpc

KV_FRACTION = 0.002  # of MemAvailable: a few thousand blocks of the tiny model, allocated in milliseconds
BLOCK_SIZE = 16
NUM_BLOCKS = 512  # what the requests of these tests are drawn from (must be within the server's capacity)
WARMUP = dict(max_input_tokens=32, max_prefill_tokens=64, max_total_tokens=64)

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


def request_pb(request: Request) -> pb.Request:
    """Written field by field here, independently of the servicer's own conversion."""
    p, s = request.parameters, request.stopping
    return pb.Request(
        id=request.id,
        input_ids=request.input_ids,
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
            stop_sequences=s.stop_sequences,
            ignore_eos_token=s.ignore_eos_token,
        ),
        prefill_logprobs=request.prefill_logprobs,
        top_n_tokens=request.top_n_tokens,
        blocks=request.blocks,
        slots=request.slots,
    )


def prefill(stub, batch_id: int, requests: list[Request]) -> pb.PrefillResponse:
    return stub.Prefill(
        pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=[request_pb(r) for r in requests]))
    )


def collect(out: dict, generations) -> None:
    for g in generations:
        out.setdefault(g.request_id, []).append(g)


def decode_to_end(stub, cached: pb.CachedBatch | None, out: dict) -> None:
    while cached is not None:
        response = stub.Decode(pb.DecodeRequest(batches=[cached]))
        assert response.total_ns > 0
        collect(out, response.generations)
        cached = response.batch if response.HasField("batch") else None


def engine_run(model, requests: list[Request]) -> dict:
    """Each request alone in the in-process engine: request id -> its generations."""
    out: dict = {}
    for request in requests:
        batch = FlashCausalLMBatch.from_requests(0, [request], model)
        while batch is not None:
            generations, batch = model.generate_token(batch)
            collect(out, generations)
    return out


def assert_same(served: dict, expected: dict) -> None:
    assert sorted(served) == sorted(expected)
    for rid, want in expected.items():
        got = served[rid]
        assert [g.tokens.ids[0] for g in got] == [g.tokens.ids[0] for g in want], f"request {rid}"
        assert [g.tokens.texts[0] for g in got] == [g.tokens.texts[0] for g in want], f"request {rid}"
        for g, w in zip(got, want):
            assert math.isclose(g.tokens.logprobs[0], w.tokens.logprobs[0], rel_tol=1e-4, abs_tol=1e-4)
        final, final_want = got[-1], want[-1]
        assert final.HasField("generated_text") and final_want.generated_text is not None
        assert final.generated_text.text == final_want.generated_text.text
        assert final.generated_text.generated_tokens == final_want.generated_text.generated_tokens
        assert final.generated_text.finish_reason == int(final_want.generated_text.finish_reason)
        assert final.generated_text.HasField("seed") == (final_want.generated_text.seed is not None)
        assert not any(g.HasField("generated_text") for g in got[:-1])


SAMPLED = SamplingParameters(do_sample=True, temperature=0.75, top_k=20, seed=1234)  # exact in float32


def some_requests(
    allocator: BlockAllocator, first_id: int, count: int, seed: int = 0, max_new_tokens: int = 6
):
    g = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(count):
        length = int(torch.randint(2, 30, (1,), generator=g))
        prompt = torch.randint(3, 990, (length,), generator=g).tolist()
        params = SAMPLED if i % 2 else SamplingParameters()
        requests.append(
            make_request(
                allocator, first_id + i, prompt, max_new_tokens=max_new_tokens + i, parameters=params
            )
        )
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
    assert (info.block_size, info.world_size, info.vocab_size) == (BLOCK_SIZE, 1, 1000)
    assert info.max_position_embeddings == 512
    assert sorted(info.eos_token_ids) == [2, 998]
    assert set(info.features) == {"top_n_tokens", "prefill_logprobs"}
    assert shard.stub.Health(pb.HealthRequest()) == pb.HealthResponse()
    urls = shard.stub.ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls
    assert list(urls) == [f"unix://{shard.socket}"]


def test_prefill_and_decode_match_the_engine(stub, engine, allocator):
    requests = some_requests(allocator, 1, 4)
    requests.append(
        make_request(allocator, 5, [7, 8, 9], max_new_tokens=3, prefill_logprobs=True, top_n_tokens=3)
    )
    response = prefill(stub, 1, requests)
    assert response.total_ns >= response.forward_ns > 0
    assert list(response.batch.request_ids) == [1, 2, 3, 4, 5]
    assert response.batch.current_tokens == sum(len(r.input_ids) for r in requests)
    served: dict = {}
    collect(served, response.generations)
    first = {g.request_id: g for g in response.generations}
    assert list(first[5].prefill_tokens.ids) == [7, 8, 9] and math.isnan(first[5].prefill_tokens.logprobs[0])
    assert len(first[5].top_tokens.ids) == 3 and not first[1].HasField("prefill_tokens")
    decode_to_end(stub, response.batch, served)
    expected = engine_run(engine, requests)
    assert_same(served, expected)
    prefill_want = expected[5][0].prefill_tokens
    assert list(first[5].prefill_tokens.texts) == prefill_want.texts
    for got, want in zip(first[5].prefill_tokens.logprobs[1:], prefill_want.logprobs[1:]):
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-4)


def test_filter_batch_drops_cancelled_requests(stub, engine, allocator):
    requests = some_requests(allocator, 10, 3, seed=1, max_new_tokens=5)
    response = prefill(stub, 2, requests)
    served: dict = {}
    collect(served, response.generations)
    response = stub.Decode(pb.DecodeRequest(batches=[response.batch]))
    collect(served, response.generations)
    error = rpc_error(stub.FilterBatch, pb.FilterBatchRequest(batch_id=2, request_ids=[10, 99]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "99" in error.details()
    filtered = stub.FilterBatch(pb.FilterBatchRequest(batch_id=2, request_ids=[12, 10])).batch
    assert (filtered.id, list(filtered.request_ids)) == (2, [10, 12])
    decode_to_end(stub, filtered, served)
    expected = engine_run(engine, [requests[0], requests[2]])
    assert_same({rid: served[rid] for rid in (10, 12)}, expected)
    assert len(served[11]) == 2  # cancelled after its second token
    # a filter that keeps nothing forgets the batch
    response = prefill(stub, 3, some_requests(allocator, 20, 2, max_new_tokens=5))
    assert not stub.FilterBatch(pb.FilterBatchRequest(batch_id=3)).HasField("batch")
    error = rpc_error(stub.Decode, pb.DecodeRequest(batches=[response.batch]))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_decode_concatenates_several_batches(stub, engine, allocator):
    first = some_requests(allocator, 30, 2, seed=2)
    second = some_requests(allocator, 40, 3, seed=3)
    served: dict = {}
    a = prefill(stub, 4, first)
    b = prefill(stub, 5, second)
    collect(served, [*a.generations, *b.generations])
    response = stub.Decode(pb.DecodeRequest(batches=[a.batch, b.batch]))
    assert response.HasField("concat_ns")
    assert response.batch.id == 4 and list(response.batch.request_ids) == [30, 31, 40, 41, 42]
    collect(served, response.generations)
    assert rpc_error(stub.Decode, pb.DecodeRequest(batches=[b.batch])).code() == grpc.StatusCode.NOT_FOUND
    decode_to_end(stub, response.batch, served)
    assert_same(served, engine_run(engine, first + second))


def test_clear_cache_forgets_batches(stub, allocator):
    one = prefill(stub, 6, some_requests(allocator, 50, 1))
    two = prefill(stub, 7, some_requests(allocator, 60, 1))
    stub.ClearCache(pb.ClearCacheRequest(id=6))
    error = rpc_error(stub.Decode, pb.DecodeRequest(batches=[one.batch]))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "6" in error.details()
    stub.Decode(pb.DecodeRequest(batches=[two.batch]))
    stub.ClearCache(pb.ClearCacheRequest())
    assert rpc_error(stub.Decode, pb.DecodeRequest(batches=[two.batch])).code() == grpc.StatusCode.NOT_FOUND


def _bad_requests(allocator: BlockAllocator) -> list[tuple[str, list[pb.Request], str]]:
    good = request_pb(make_request(allocator, 70, [5, 6, 7], max_new_tokens=4))
    out_of_vocab = pb.Request()
    out_of_vocab.CopyFrom(good)
    out_of_vocab.input_ids[1] = 1000
    long_prompt = request_pb(make_request(allocator, 71, list(range(3, 3 + 2 * BLOCK_SIZE)), max_new_tokens=1))
    few_blocks = pb.Request()
    few_blocks.CopyFrom(long_prompt)
    del few_blocks.blocks[1:]
    del few_blocks.slots[:]
    off_block = pb.Request()
    off_block.CopyFrom(good)
    off_block.slots[1] = off_block.slots[1] + BLOCK_SIZE if off_block.slots[1] >= BLOCK_SIZE else 10**6
    outside = pb.Request()
    outside.CopyFrom(good)
    outside.blocks[0] = 10**7
    no_length = pb.Request()
    no_length.CopyFrom(good)
    no_length.stopping_parameters.max_new_tokens = 0
    return [
        ("vocabulary", [out_of_vocab], "1000"),
        ("blocks shorter than the prompt", [few_blocks], "cannot hold its"),
        ("slot outside its blocks", [off_block], "block table"),
        ("block outside the cache", [outside], "block"),
        ("duplicate ids", [good, good], "unique"),
        ("max_new_tokens 0", [no_length], "max_new_tokens"),
        ("empty batch", [], "no requests"),
    ]


def test_bad_requests_are_refused_and_the_shard_keeps_serving(stub, allocator, engine):
    for name, requests, needle in _bad_requests(allocator):
        error = rpc_error(stub.Prefill, pb.PrefillRequest(batch=pb.Batch(id=8, requests=requests)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert needle in error.details(), (name, error.details())
    valid = make_request(allocator, 80, [11, 12, 13, 14], max_new_tokens=3)
    live = prefill(stub, 9, [valid])
    # a request id already held by a cached batch, and a batch id already cached
    error = rpc_error(prefill, stub, 10, [make_request(allocator, 80, [5], max_new_tokens=1)])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "80" in error.details()
    error = rpc_error(prefill, stub, 9, [make_request(allocator, 81, [5], max_new_tokens=1)])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "9" in error.details()
    # an unknown id among the batches leaves the known one intact
    error = rpc_error(stub.Decode, pb.DecodeRequest(batches=[live.batch, pb.CachedBatch(id=999)]))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "999" in error.details()
    assert rpc_error(stub.Decode, pb.DecodeRequest()).code() == grpc.StatusCode.INVALID_ARGUMENT
    error = rpc_error(stub.Decode, pb.DecodeRequest(batches=[live.batch, live.batch]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = rpc_error(stub.FilterBatch, pb.FilterBatchRequest(batch_id=999))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    # extensions: of a request the batch does not hold, of a block outside the cache, twice the same request
    for extensions, needle in (
        ([pb.BlockTableExtension(request_id=12345, blocks=[1])], "12345"),
        ([pb.BlockTableExtension(request_id=80, blocks=[10**7])], "outside"),
        ([pb.BlockTableExtension(request_id=80), pb.BlockTableExtension(request_id=80)], "twice"),
    ):
        error = rpc_error(stub.Decode, pb.DecodeRequest(batches=[live.batch], extensions=extensions))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in error.details(), error.details()
    served: dict = {}
    collect(served, live.generations)
    decode_to_end(stub, live.batch, served)
    assert_same(served, engine_run(engine, [valid]))
    stub.Health(pb.HealthRequest())


def test_prefill_before_warmup_then_sigterm(tiny_internlm2_dir, tmp_path):
    shard = start_shard(tiny_internlm2_dir, tmp_path)
    try:
        request = request_pb(make_request(BlockAllocator(4, BLOCK_SIZE), 1, [5, 6], max_new_tokens=2))
        error = rpc_error(shard.stub.Prefill, pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request])))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "Warmup" in error.details()
        error = rpc_error(shard.stub.Decode, pb.DecodeRequest(batches=[pb.CachedBatch(id=1)]))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        shard.stub.Health(pb.HealthRequest())
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


def free_port() -> int:
    with socket_module.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        pool = futures.ThreadPoolExecutor(2)

        def both(method: str, message):
            return list(pool.map(lambda shard: getattr(shard.stub, method)(message, timeout=60), shards))

        urls = shards[0].stub.ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls
        assert list(urls) == [f"unix://{shard.socket}" for shard in shards]
        assert shards[1].stub.Info(pb.InfoRequest()).world_size == 2
        capacity = min(w.num_blocks for w in both("Warmup", pb.WarmupRequest(**WARMUP)))
        assert capacity >= NUM_BLOCKS
        requests = some_requests(BlockAllocator(NUM_BLOCKS, BLOCK_SIZE), 1, 2, seed=5)
        batch = pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request_pb(r) for r in requests]))
        answers = both("Prefill", batch)
        served: dict = {}
        while True:
            assert answers[1].generations == [] and answers[0].batch == answers[1].batch
            collect(served, answers[0].generations)
            if not answers[0].HasField("batch"):
                break
            answers = both("Decode", pb.DecodeRequest(batches=[answers[0].batch]))
        expected = engine_run(engine, requests)
        assert {rid: [g.tokens.ids[0] for g in gs] for rid, gs in served.items()} == {
            rid: [g.tokens.ids[0] for g in gs] for rid, gs in expected.items()
        }
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
    from text_generation_server.server import ErrorPolicy, NotFound

    stopped = []

    class Broken(generate_pb2_grpc.TextGenerationServiceServicer):
        def Health(self, request, context):
            raise RuntimeError("device lost")

        def Info(self, request, context):
            raise NotFound("nothing here")

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
            assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, "nothing here")
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


def test_decode_grows_block_tables_through_extensions(stub, allocator, engine):
    """A request given blocks for its prompt only: Decode without a block for the step is refused and changes
    nothing; with the extension it goes on and gives the engine's tokens."""
    full = make_request(allocator, 90, list(range(3, 3 + BLOCK_SIZE)), max_new_tokens=3)
    prompt_only = Request(**{**full.__dict__, "blocks": full.blocks[:1], "slots": ()})
    live = prefill(stub, 20, [prompt_only])
    served: dict = {}
    collect(served, live.generations)
    error = rpc_error(stub.Decode, pb.DecodeRequest(batches=[live.batch]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "no KV block for position 16" in error.details()
    extension = pb.BlockTableExtension(request_id=90, blocks=full.blocks[1:2])
    response = stub.Decode(pb.DecodeRequest(batches=[live.batch], extensions=[extension]))
    collect(served, response.generations)
    decode_to_end(stub, response.batch, served)
    assert_same(served, engine_run(engine, [full]))
