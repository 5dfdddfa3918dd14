#!/usr/bin/env python
"""Convert a Hugging Face InternLM2 checkpoint directory into a Llama one.

Usage: python scripts/convert_internlm2_to_llama.py SRC DST [--dtype bfloat16] [--force] [--verify] [--quiet]

The logic lives in text_generation_server.utils.convert_checkpoint (shared with the reverse direction).
"""

from __future__ import annotations

import sys

from text_generation_server.utils.convert_checkpoint import TO_LLAMA, main

if __name__ == "__main__":
    sys.exit(main(TO_LLAMA))
