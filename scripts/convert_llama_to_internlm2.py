#!/usr/bin/env python
"""Convert a Hugging Face Llama checkpoint directory into an InternLM2 one.

Usage: python scripts/convert_llama_to_internlm2.py SRC DST [--dtype bfloat16] [--force] [--verify] [--quiet]

The logic lives in text_generation_server.utils.convert_checkpoint (shared with the reverse direction).
"""

from __future__ import annotations

import sys

from text_generation_server.utils.convert_checkpoint import TO_INTERNLM2, main

if __name__ == "__main__":
    sys.exit(main(TO_INTERNLM2))
