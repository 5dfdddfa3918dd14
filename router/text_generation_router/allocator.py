"""The router's KV block allocator: the shards' cache is `num_blocks` blocks of `block_size` tokens, and the
router decides which request owns which block (proto/generate.proto, `Request.blocks`).

A plain free list: blocks are handed out from the low ids up and returned when a request finishes, is
cancelled or is preempted. Not thread-safe; only the scheduler task uses it.
"""

from __future__ import annotations

from collections.abc import Iterable


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # a stack: pop() from the end hands out the lowest free id first
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return len(self._used)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` positions."""
        return -(-max(tokens, 0) // self.block_size)

    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks, or None (and nothing taken) when fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            return None
        blocks = [self._free.pop() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        blocks = list(blocks)
        for block in blocks:
            if block not in self._used:
                raise ValueError(f"block {block} is not allocated (double free?)")
        for block in blocks:
            self._used.remove(block)
        # keep low ids first out: freed blocks go back sorted onto the stack
        self._free.extend(sorted(blocks, reverse=True))

    def __repr__(self) -> str:
        return f"BlockAllocator(free={self.free_blocks}/{self.num_blocks}, block_size={self.block_size})"
