"""The router alone: `text-generation-router` against a stand-in shard that answers every step at once.

With no model time, the waves measure what the router itself costs a token (HTTP, planning, gRPC, detokenizing,
the event streams) without the shard's two OpenMP threads on the same cores; beside the served stack's figure it
says how much of the router's CPU the sharing adds. The stand-in (`InstantShard`, run as
`python -m text_generation_launcher.benchmark.router_alone UDS IDS VOCAB EOS`) keeps each request's length and
answers with ids cycled from a list of ordinary words, one per request that reaches the end of its tokens, and the
finish at its `max_new_tokens`; steps are answered one at a time in `step_id` order, as the real shard runs them
(with two steps in flight the second can arrive first).
"""

from __future__ import annotations

import json
import sys
import threading
from concurrent import futures
from pathlib import Path

from text_generation_common.pb import generate_pb2 as pb
from text_generation_common.sockets import free_port

from .peers import answers, run_wave
from .served import ServerProcess, new_socket_dir, process_cpu_seconds
from .workloads import Prompt

FEATURES = ("top_n_tokens", "prefill_logprobs", "chunked_prefill", "grammar")
BLOCK_SIZE = 128
NUM_BLOCKS = 4096
STEP_ORDER_WAIT_S = 10.0  # a step whose predecessor has not come by then fails the wave instead of hanging it


class InstantShard:
    """The shard protocol without a model: Step answers from each request's token count alone."""

    def __init__(self, token_ids: list[int], vocab_size: int, eos_token_ids: list[int], uds: str):
        self.token_ids, self.vocab_size, self.eos_token_ids, self.uds = token_ids, vocab_size, eos_token_ids, uds
        self.requests: dict[int, list[int]] = {}  # id -> [known tokens, prompt length, computed, max_new_tokens]
        self.step_order = threading.Condition()
        self.last_step_id = 0  # the last step answered since ClearCache

    def Info(self, request, context):
        return pb.InfoResponse(
            model_id="instant-shard", architecture="InternLM2ForCausalLM", dtype="none", device_type="cpu",
            block_size=BLOCK_SIZE, world_size=1, vocab_size=self.vocab_size, max_position_embeddings=32768,
            eos_token_ids=self.eos_token_ids, features=FEATURES, kernels="none",
        )

    def ServiceDiscovery(self, request, context):
        return pb.ServiceDiscoveryResponse(urls=[f"unix://{self.uds}-0"])

    def Health(self, request, context):
        return pb.HealthResponse()

    def ClearCache(self, request, context):
        with self.step_order:
            self.requests.clear()
            self.last_step_id = 0
        return pb.ClearCacheResponse()

    def Warmup(self, request, context):
        return pb.WarmupResponse(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                                 max_supported_total_tokens=NUM_BLOCKS * BLOCK_SIZE)

    def Step(self, request, context):
        with self.step_order:
            if not self.step_order.wait_for(lambda: request.step_id <= self.last_step_id + 1, STEP_ORDER_WAIT_S):
                raise RuntimeError(f"step {request.step_id - 1} did not come within {STEP_ORDER_WAIT_S}s")
            self.last_step_id = max(self.last_step_id, request.step_id)
            self.step_order.notify_all()
            return self._answer(request)

    def _answer(self, request) -> pb.StepResponse:
        for request_id in request.released:
            self.requests.pop(request_id, None)
        generations = []
        for scheduled in request.requests:
            if scheduled.HasField("new_request"):
                new = scheduled.new_request
                self.requests[scheduled.id] = [len(new.token_ids), new.prompt_length, new.num_cached_tokens,
                                               new.stopping_parameters.max_new_tokens]
            state = self.requests.get(scheduled.id)
            if state is None:
                continue  # it finished in the step before, which the router planned this one without
            state[2] += scheduled.num_tokens
            if state[2] < state[0]:
                continue  # a prompt chunk short of the prompt's end
            generated = state[0] - state[1] + 1
            generation = pb.Generation(request_id=scheduled.id, token_id=self.token_ids[state[0] % len(self.token_ids)],
                                       logprob=-1.0)
            state[0] += 1
            if generated >= state[3]:
                generation.finish_reason = pb.FINISH_REASON_LENGTH
                del self.requests[scheduled.id]
            generations.append(generation)
        return pb.StepResponse(generations=generations)


def start_instant_shard(token_ids: list[int], vocab_size: int, eos_ids: list[int], log_path: Path):
    """`InstantShard` in a process of its own, listening: (its ServerProcess, the socket to give the router as
    --master-shard-uds-path). Closing the process removes the socket's directory."""
    socket_dir = new_socket_dir()
    uds = str(socket_dir / "shard")
    shard = ServerProcess(
        [sys.executable, "-m", __name__, uds, ",".join(map(str, token_ids)), str(vocab_size),
         ",".join(map(str, eos_ids))], log_path)
    shard.socket_dir = socket_dir
    shard.wait_ready(lambda: Path(f"{uds}-0").exists(), 60)
    return shard, f"{uds}-0"


class RouterAlone:
    """The router's process and the stand-in shard's, for the waves of `prompts` (ordinary words)."""

    def __init__(self, model_dir: Path, prompts: list[Prompt], max_input: int, max_total: int, out: Path):
        config = json.loads((model_dir / "config.json").read_text())
        eos = config.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        token_ids = sorted({i for p in prompts for i in p.ids} - set(eos_ids))[:64]
        self.shard, uds = start_instant_shard(token_ids, config["vocab_size"], eos_ids, out / "router-alone-shard.log")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        router = Path(sys.executable).with_name("text-generation-router")
        self.router = ServerProcess(
            [str(router), "--master-shard-uds-path", uds, "--tokenizer-name", str(model_dir),
             "--hostname", "127.0.0.1", "--port", str(port), "--grpc-port", "0",
             "--max-input-tokens", str(max_input), "--max-total-tokens", str(max_total)],
            out / "router-alone.log")
        self.router.wait_ready(lambda: answers(self.url + "/health"), 120)

    def wave(self, prompts: list[Prompt]) -> dict:
        """One wave (see `peers.run_wave`) and the router's CPU time a generated token over it (from /proc)."""
        before = process_cpu_seconds(self.router.process.pid)
        figures = run_wave(self.url, prompts)
        figures["router_cpu_ms_per_token"] = (
            1000 * (process_cpu_seconds(self.router.process.pid) - before) / figures["generated_tokens"])
        return figures

    def close(self) -> None:
        self.router.close()
        self.shard.close()


def main(argv: list[str]) -> None:
    import grpc

    from text_generation_common.pb import generate_pb2_grpc

    uds, ids, vocab_size, eos = argv
    shard = InstantShard([int(i) for i in ids.split(",")], int(vocab_size), [int(i) for i in eos.split(",") if i], uds)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))  # a step may wait here for the one before it
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(shard, server)
    server.add_insecure_port(f"unix://{uds}-0")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main(sys.argv[1:])
