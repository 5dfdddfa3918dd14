# The two commands a new machine needs: `make install`, then `make test`.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin

PROTOS := $(wildcard proto/*.proto)
STUBS  := $(patsubst proto/%.proto,server/text_generation_server/pb/%_pb2.py,$(PROTOS))

.PHONY: install stubs test run clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	$(BIN)/pip install --no-deps text-generation==0.7.0
	$(MAKE) stubs

# gRPC stubs are generated, never committed. The proto path maps proto/ to the package, so the stubs import
# each other as text_generation_server.pb.*.
stubs: $(STUBS)

server/text_generation_server/pb/%_pb2.py: proto/%.proto
	$(BIN)/python -m grpc_tools.protoc -Itext_generation_server/pb=proto \
		--python_out=server --grpc_python_out=server --pyi_out=server $<

# The embedded default model: a small random-weight InternLM2 in the real checkpoint layout, written on first use.
DEFAULT_MODEL := models/tiny-internlm2

$(DEFAULT_MODEL)/config.json:
	$(BIN)/python scripts/make_tiny_internlm2.py $(DEFAULT_MODEL) --hidden 256 --layers 4 --heads 8 --kv-heads 2 \
		--intermediate 688 --vocab 2048 --max-pos 4096

run: stubs $(DEFAULT_MODEL)/config.json
	$(BIN)/text-generation-launcher --model-id $(DEFAULT_MODEL)

test: stubs
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info server/*.egg-info server/text_generation_server/pb/*_pb2*
