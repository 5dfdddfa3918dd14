"""Model presets, the benchmark model directory, and the seeded workloads every engine gets.

Prompts are text (the served stack takes text) built from words that are single tokens of the model's
tokenizer, then tokenized with the same `Tokenizer` the router uses: the ids the in-process engine and
transformers get are exactly the ids the router produces from the text.
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]

# make_tiny_internlm2 keyword arguments for each preset (max_position_embeddings 4096 unless given)
DYNAMIC_NTK = {"type": "dynamic", "factor": 2.0}
PRESETS: dict[str, dict] = {
    "smoke": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1000),
    "small": dict(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=92544),
    "1_8b": dict(hidden=2048, layers=24, heads=16, kv_heads=8, intermediate=8192, vocab=92544),
    # the long-context workload: a tiny model whose 200k-token prompt runs far past max_position_embeddings
    "long": dict(hidden=64, layers=2, heads=4, kv_heads=1, intermediate=128, vocab=1000, max_pos=32768,
                 rope_scaling=DYNAMIC_NTK),
    "smoke-long": dict(hidden=64, layers=2, heads=4, kv_heads=1, intermediate=128, vocab=1000, max_pos=512,
                       rope_scaling=DYNAMIC_NTK),
}


@dataclass(frozen=True)
class Workloads:
    """Sizes of every workload (a preset of the benchmark, not of the model)."""

    decode_prompt: int = 128
    decode_new: int = 128
    prefill_prompt: int = 512
    prefill_repeats: int = 3
    mixed_prompt: tuple[int, int] = (32, 512)
    mixed_output: tuple[int, int] = (16, 256)
    concurrency: tuple[int, ...] = (1, 8, 32)
    requests: int = 32  # per concurrency level
    step_streams: int = 32  # streams of the "cost of the layers" decode step
    step_prompt: int = 128
    step_new: int = 64
    # the wave against the peers: every stream of a level sent at once, one prompt size, one output size
    wave_prompt: int = 128
    wave_new: int = 128
    wave_concurrency: tuple[int, ...] = (1, 8, 32)

    @property
    def max_total_tokens(self) -> int:
        return max(self.decode_prompt + self.decode_new, self.prefill_prompt + 1,
                   self.mixed_prompt[1] + self.mixed_output[1], self.step_prompt + self.step_new,
                   self.wave_prompt + self.wave_new) + 8


# The constrained decode step: every stream's output must be JSON valid under this schema. Its records never
# end within step_new tokens, so each step masks by strings, numbers, enums and the structure between them.
STEP_JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "minItems": 100,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "role": {"enum": ["admin", "user", "guest"]},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
                },
                "required": ["name", "age", "role", "tags"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["records"],
    "additionalProperties": False,
}


SMOKE_WORKLOADS = Workloads(
    decode_prompt=16, decode_new=8, prefill_prompt=32, prefill_repeats=1, mixed_prompt=(8, 24), mixed_output=(4, 10),
    concurrency=(1, 2), requests=3, step_streams=2, step_prompt=8, step_new=8, wave_prompt=8, wave_new=4,
    wave_concurrency=(1, 2),
)


@dataclass
class Prompt:
    text: str
    ids: list[int]
    max_new_tokens: int


@dataclass
class PromptSet:
    decode: Prompt
    prefill: Prompt
    mixed: list[Prompt]
    step: list[Prompt]
    waves: dict[int, list[Prompt]]  # concurrency -> its prompts (no prompt shared between waves)
    wave_warmup: list[Prompt]
    meta: dict = field(default_factory=dict)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _make_tiny():
    scripts = str(REPO_ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import make_tiny_internlm2  # noqa: PLC0415 - scripts/ is not a package

    return make_tiny_internlm2


def _unreachable_eos(model_dir: Path) -> list[int]:
    """Zero the lm_head rows of every EOS id: their logit is exactly 0, never the argmax of a random model.

    The HTTP API has no `ignore_eos_token`: with this, greedy generation never stops before max_new_tokens in
    any engine, so all of them generate the same number of tokens (the in-process runs also set
    ignore_eos_token, transformers gets no eos id).
    """
    from safetensors.torch import load_file, save_file

    from text_generation_common.tokenizer import Tokenizer

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = Tokenizer.from_pretrained(model_dir, vocab_size=config["vocab_size"])
    generation = json.loads((model_dir / "generation_config.json").read_text())
    eos = generation.get("eos_token_id") or []
    eos = set(eos if isinstance(eos, list) else [eos])
    for name in (tokenizer.eos_token_id, tokenizer.token_to_id("<|im_end|>")):
        if name is not None:
            eos.add(int(name))
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(path)
        if "output.weight" in tensors:
            weight = tensors["output.weight"].clone()
            weight[sorted(eos)] = 0
            tensors["output.weight"] = weight
            save_file(tensors, path, metadata={"format": "pt"})
    return sorted(eos)


def prepare_models(preset: str, dtype: str, root: Path, log=print) -> tuple[Path, Path]:
    """The InternLM2 checkpoint (ours) and its Llama-layout conversion (transformers), built once and cached."""
    from text_generation_server.utils.convert_checkpoint import TO_LLAMA, convert_checkpoint

    shape = PRESETS[preset]
    key = f"{preset}-{dtype}"
    internlm2, llama = root / f"{key}-internlm2", root / f"{key}-llama"
    done = root / f"{key}.ready"
    if done.exists() and (internlm2 / "config.json").exists() and (llama / "config.json").exists():
        return internlm2, llama
    log(f"writing the random-weight {preset} model ({dtype}) into {root}")
    make_tiny = _make_tiny()
    make_tiny.make_tiny_internlm2(internlm2, **{"max_pos": 4096, **shape}, dtype=dtype, shards=1, seed=0)
    eos = _unreachable_eos(internlm2)
    convert_checkpoint(TO_LLAMA, internlm2, llama, force=True, show_progress=False)
    done.write_text(json.dumps({"preset": preset, "dtype": dtype, "shape": shape, "unreachable_eos": eos}))
    return internlm2, llama


class PromptMaker:
    """Seeded prompt texts of an exact token count (BOS included), for the model's tokenizer."""

    def __init__(self, model_dir: Path):
        from text_generation_common.tokenizer import Tokenizer

        config = json.loads((model_dir / "config.json").read_text())
        self.tokenizer = Tokenizer.from_pretrained(model_dir, vocab_size=config["vocab_size"])
        self.words = self._single_token_words()

    def _single_token_words(self) -> list[str]:
        make_tiny = _make_tiny()
        candidates = sorted({w.strip(".,;:!?'\"()") for line in make_tiny.build_corpus() for w in line.split()})
        words = []
        for word in candidates:
            if word and word.isalpha() and len(self.tokenizer.encode(" " + word, add_special_tokens=False)) == 1:
                words.append(word)
        if len(words) < 20:  # a tokenizer with few whole words: any word then, counted by re-encoding
            words = [w for w in candidates if w.isalpha()]
        return words

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def make(self, rng: random.Random, tokens: int, max_new_tokens: int) -> Prompt:
        count = max(tokens - 1, 1)
        chosen = [rng.choice(self.words) for _ in range(count + 8)]
        for _ in range(64):
            text = " ".join(chosen[:count])
            ids = self.encode(text)
            if len(ids) == tokens:
                break
            count += 1 if len(ids) < tokens else -1
            while count > len(chosen):
                chosen.append(rng.choice(self.words))
        return Prompt(text=text, ids=ids, max_new_tokens=max_new_tokens)


def make_prompts(model_dir: Path, workloads: Workloads, seed: int) -> PromptSet:
    maker = PromptMaker(model_dir)
    rng = random.Random(seed)
    w = workloads
    decode = maker.make(rng, w.decode_prompt, w.decode_new)
    prefill = maker.make(rng, w.prefill_prompt, 1)
    mixed = [
        maker.make(rng, rng.randint(*w.mixed_prompt), rng.randint(*w.mixed_output)) for _ in range(w.requests)
    ]
    step = [maker.make(rng, w.step_prompt, w.step_new) for _ in range(w.step_streams)]
    # drawn after the others, so that those stay what earlier commits drew from the same seed
    waves = {c: [maker.make(rng, w.wave_prompt, w.wave_new) for _ in range(c)] for c in w.wave_concurrency}
    warmup = [maker.make(rng, w.wave_prompt, 4) for _ in range(min(4, max(w.wave_concurrency)))]
    return PromptSet(decode=decode, prefill=prefill, mixed=mixed, step=step, waves=waves, wave_warmup=warmup,
                     meta={"seed": seed, **asdict(w)})
