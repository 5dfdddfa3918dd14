from __future__ import annotations

from text_generation_server.models.custom_modeling.flash_internlm2_modeling_ascend import (
    FlashInternlm2ForCausalLM,
)
from text_generation_server.models.flash_llama import FlashLlama

# InternLM2 chat models end a turn with <|im_end|>; generation_config files saved before the fix list only </s>.
CHAT_TURN_END = "<|im_end|>"


class FlashInternlm2(FlashLlama):
    """InternLM2 / InternLM2.5 checkpoints, read natively (no remote code)."""

    model_class = FlashInternlm2ForCausalLM

    def _eos_token_ids(self) -> frozenset[int]:
        turn_end = self.tokenizer.token_to_id(CHAT_TURN_END)
        extra = {turn_end} if turn_end is not None else set()
        return super()._eos_token_ids() | extra
