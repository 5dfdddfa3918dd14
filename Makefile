# The two commands a new machine needs: `make install`, then `make test`.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin

PROTOS := $(wildcard proto/*.proto)
STUBS  := $(patsubst proto/%.proto,server/text_generation_server/pb/%_pb2.py,$(PROTOS))

.PHONY: install stubs test clean

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

test: stubs
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info server/*.egg-info server/text_generation_server/pb/*_pb2*
