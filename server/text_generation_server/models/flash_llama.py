from __future__ import annotations

from text_generation_server.models.custom_modeling.flash_llama_modeling import FlashLlamaForCausalLM
from text_generation_server.models.flash_causal_lm import FlashCausalLM


class FlashLlama(FlashCausalLM):
    """Hugging Face `LlamaForCausalLM` checkpoints."""

    model_class = FlashLlamaForCausalLM
