"""The KV cache's blocks, owned here and nowhere else.

The shards' cache is `num_blocks` blocks of `block_size` token slots (proto/generate.proto). Every block is free
or held by one or more requests, counted by a reference count. With prefix caching, a block a request has filled
completely is identified by a hash of its tokens, of the hash of the block before it and of an extra key (what
else its keys depend on), so equal hashes mean equal whole prefixes; a request whose prompt starts with cached
blocks holds them too instead of computing them again. A block nobody holds any more keeps its contents and
stays findable by its hash until its space is needed.

Free blocks are handed out from the front of one queue: blocks that cache nothing go to its front when freed,
cached ones to its back, so the least recently used cached prefix is evicted first and only when no empty
block is left. A held block is never evicted. Not thread-safe: only the scheduler uses it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence

BlockHash = bytes

_TOKEN_ARRAY = "I"
assert array(_TOKEN_ARRAY).itemsize == 4, "token ids are hashed as 32-bit integers"


def block_hash(parent: BlockHash | None, tokens: Sequence[int], extra_key: int) -> BlockHash:
    """The identity of a full block: its tokens, its extra key and (through `parent`) every block before it."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent or b"root")
    digest.update(extra_key.to_bytes(8, "little", signed=False))
    digest.update(array(_TOKEN_ARRAY, tokens).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # handed out from the front
        self._hash_of: dict[int, BlockHash] = {}  # cached blocks, held or free
        self._block_of: dict[BlockHash, int] = {}

    # ----- sizes ------------------------------------------------------------------------------------------

    @property
    def free_blocks(self) -> int:
        """Blocks no request holds (cached ones included: they are evicted when needed)."""
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        """Blocks held by at least one request."""
        return self.num_blocks - len(self._free)

    @property
    def cached_blocks(self) -> int:
        """Blocks holding a cached prefix, held or not."""
        return len(self._hash_of)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` positions."""
        return -(-max(tokens, 0) // self.block_size)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    # ----- holding and letting go ---------------------------------------------------------------------------

    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks held by the caller, or None (and nothing taken) when fewer are free."""
        if count < 0:
            raise ValueError(f"cannot allocate {count} blocks")
        if count > len(self._free):
            return None
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """The caller lets go of `blocks` (a request's table, in position order)."""
        for block, count in Counter(blocks).items():
            if self._ref_counts[block] < count:
                raise ValueError(f"block {block} is not held (released twice?)")
        # last blocks first: among a request's cached blocks its deepest ones are evicted first
        for block in reversed(blocks):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None
                if block not in self._hash_of:
                    self._free.move_to_end(block, last=False)

    # ----- the prefix cache ---------------------------------------------------------------------------------

    def lookup(self, hashes: Iterable[BlockHash]) -> list[int]:
        """The cached blocks of the longest run of `hashes` from the first, each now also held by the caller."""
        found: list[int] = []
        if not self.prefix_caching:
            return found
        for digest in hashes:
            block = self._block_of.get(digest)
            if block is None:
                break
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1
            found.append(block)
        return found

    def register(self, block: int, digest: BlockHash) -> None:
        """`block`, held and now full, holds the prefix `digest` (a block already caching it stays the one found)."""
        assert self._ref_counts[block] > 0, "only a held block is filled"
        if not self.prefix_caching or digest in self._block_of or block in self._hash_of:
            return
        self._block_of[digest] = block
        self._hash_of[block] = digest

    def _forget(self, block: int) -> None:
        digest = self._hash_of.pop(block, None)
        if digest is not None:
            del self._block_of[digest]

    def __repr__(self) -> str:
        return (
            f"BlockManager(free={self.free_blocks}/{self.num_blocks}, cached={self.cached_blocks}, "
            f"block_size={self.block_size})"
        )
