"""`ShardedClient`: the router's side of proto/generate.proto, over grpc.aio.

Connects to the master shard's socket, asks it for every rank's URL (ServiceDiscovery) and keeps one channel
per rank. Every model call goes to every rank at once (the ranks run the same step together); generations
come from rank 0. A failed call on any rank raises `GenerationError` with the shard's message.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from grpc import aio

from text_generation_router.types import GenerationError
from text_generation_common.pb import generate_pb2 as pb
from text_generation_common.pb import generate_pb2_grpc

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class ShardError(GenerationError):
    """A shard call failed; `code` is the gRPC status code name (e.g. "INVALID_ARGUMENT")."""

    def __init__(self, message: str, code: str = "UNKNOWN", method: str = ""):
        super().__init__(message)
        self.code = code
        self.method = method


@dataclass
class StepResult:
    """What Step answered: rank 0's generations, the slowest rank's times."""

    generations: list  # list[pb.Generation]
    forward_ns: int = 0
    decode_ns: int = 0
    total_ns: int = 0


def _url_to_target(url: str) -> str:
    return url  # grpc understands "unix:///path" as is


class ShardedClient:
    def __init__(self, channels: list[aio.Channel], urls: list[str]):
        self._channels = channels
        self.urls = urls
        self._stubs = [generate_pb2_grpc.TextGenerationServiceStub(channel) for channel in channels]

    @property
    def world_size(self) -> int:
        return len(self._stubs)

    @classmethod
    async def connect(cls, master_uds_path: str, timeout: float = 30.0) -> ShardedClient:
        """Connect to the master shard (a socket path, or a "unix://" URL), then to every rank it lists."""
        target = master_uds_path if master_uds_path.startswith("unix:") else f"unix://{master_uds_path}"
        master = aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        try:
            await asyncio.wait_for(master.channel_ready(), timeout)
            stub = generate_pb2_grpc.TextGenerationServiceStub(master)
            answer = await stub.ServiceDiscovery(pb.ServiceDiscoveryRequest(), timeout=timeout)
        except (asyncio.TimeoutError, grpc.RpcError) as e:
            await master.close()
            detail = e.details() if isinstance(e, grpc.RpcError) else f"no answer within {timeout}s"
            raise ShardError(f"cannot reach the master shard at {target}: {detail}", method="connect") from None
        urls = list(answer.urls) or [target]
        channels = []
        for url in urls:
            if url == target:
                channels.append(master)
                continue
            channel = aio.insecure_channel(_url_to_target(url), options=CHANNEL_OPTIONS)
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout)
            except asyncio.TimeoutError:
                for c in [*channels, channel, master]:
                    await c.close()
                raise ShardError(f"cannot reach shard {url} within {timeout}s", method="connect") from None
            channels.append(channel)
        if master not in channels:
            await master.close()
        return cls(channels, urls)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def _all(self, method: str, request, timeout: float | None = None) -> list:
        """Call `method` on every rank at once; the answers in rank order, or ShardError naming the rank."""

        async def one(rank: int, stub):
            try:
                return await getattr(stub, method)(request, timeout=timeout)
            except grpc.RpcError as e:
                code = e.code().name if e.code() is not None else "UNKNOWN"
                raise ShardError(
                    f"shard {rank} {method} failed ({code}): {e.details()}", code=code, method=method
                ) from None

        if len(self._stubs) == 1:  # one rank: awaited here, without a task of its own for every call
            return [await one(0, self._stubs[0])]
        results = await asyncio.gather(*(one(r, s) for r, s in enumerate(self._stubs)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    # ----- calls ------------------------------------------------------------------------------------------

    async def info(self) -> pb.InfoResponse:
        return (await self._all("Info", pb.InfoRequest()))[0]

    async def health(self) -> None:
        await self._all("Health", pb.HealthRequest(), timeout=30)

    async def clear_cache(self) -> None:
        """Every rank forgets every request it holds."""
        await self._all("ClearCache", pb.ClearCacheRequest())

    async def warmup(self, max_input_tokens: int, max_prefill_tokens: int, max_total_tokens: int) -> pb.WarmupResponse:
        """Warmup on every rank; the smallest KV cache any rank can hold."""
        answers = await self._all(
            "Warmup",
            pb.WarmupRequest(
                max_input_tokens=max_input_tokens,
                max_prefill_tokens=max_prefill_tokens,
                max_total_tokens=max_total_tokens,
            ),
        )
        smallest = min(answers, key=lambda a: a.num_blocks)
        return pb.WarmupResponse(
            num_blocks=smallest.num_blocks,
            block_size=smallest.block_size,
            max_supported_total_tokens=smallest.num_blocks * smallest.block_size,
        )

    async def step(self, request: pb.StepRequest) -> StepResult:
        answers = await self._all("Step", request)
        return StepResult(
            generations=list(answers[0].generations),
            forward_ns=max(a.forward_ns for a in answers),
            decode_ns=max(a.decode_ns for a in answers),
            total_ns=max(a.total_ns for a in answers),
        )
