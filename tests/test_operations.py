"""What operators configure, on the real stack (shard process + router) over real sockets: --api-key, CORS,
--payload-limit, --prometheus-port, --chat-template, OpenTelemetry traces (--otlp-endpoint, received here by
a gRPC TraceService), TGI's /health after a failed step, and the rope overrides of the shard."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from concurrent import futures

import grpc
import httpx
import openai
import pytest
import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from router_stack import ROUTER_CLI, free_ports, start_stack
from text_generation import Client

API_KEY = "s3cret-key"
ALLOWED_ORIGIN = "https://ui.example"
PAYLOAD_LIMIT = 4096
SERVICE_NAME = "tgi-under-test"
TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<<assistant>>{% endif %}"


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC collector that keeps every span it is sent, with its service name."""

    def __init__(self):
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append((attributes.get("service.name"), span))
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace_of(self, input_length: int, timeout: float = 20.0) -> list:
        """Every span of the trace whose `generate` span has this input_length, once its infer span arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                spans = [span for _, span in self.spans]
            roots = [s for s in spans if s.name == "generate" and _attribute(s, "input_length") == input_length]
            if roots:
                trace = [s for s in spans if s.trace_id == roots[0].trace_id]
                if any(s.name == "infer" for s in trace):
                    return trace
            time.sleep(0.1)
        raise AssertionError(f"no complete trace arrived; spans: {[s.name for _, s in self.spans]}")


def _attribute(span, key: str):
    for attribute in span.attributes:
        if attribute.key == key:
            value = attribute.value
            return value.int_value if value.HasField("int_value") else value.string_value
    return None


@pytest.fixture(scope="module")
def receiver():
    running = TraceReceiver()
    yield running
    running.server.stop(0)


@pytest.fixture(scope="module")
def stack(tiny_internlm2_dir, tmp_path_factory, receiver):
    directory = tmp_path_factory.mktemp("operations")
    template = directory / "template.jinja"
    template.write_text(TEMPLATE)
    args = [
        "--api-key", API_KEY,
        "--cors-allow-origin", ALLOWED_ORIGIN,
        "--payload-limit", str(PAYLOAD_LIMIT),
        "--chat-template", str(template),
        "--otlp-endpoint", f"http://127.0.0.1:{receiver.port}",
        "--otlp-service-name", SERVICE_NAME,
        "--max-batch-prefill-tokens", "12",
    ]
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "100"}  # export spans within 0.1 s
    with start_stack(tiny_internlm2_dir, directory, grpc=False, prometheus=True, router_args=args, env=env) as running:
        yield running


AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY = {"inputs": "Hello there", "parameters": {"max_new_tokens": 3}}


def test_api_key_protects_generation_and_tokenize_routes_only(stack):
    url = stack.http_url
    protected = [
        ("/generate", BODY), ("/generate_stream", BODY), ("/", BODY), ("/tokenize", {"inputs": "Hello"}),
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        ("/chat_tokenize", {"messages": [{"role": "user", "content": "Hi"}]}),
    ]
    for path, body in protected:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = httpx.post(url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and r.content == b"", (path, headers, r.status_code)
        r = httpx.post(url + path, json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200, (path, r.text)
    assert httpx.post(url + "/generate", json=BODY, headers={"Authorization": f"bearer {API_KEY}"}, timeout=60).status_code == 200
    for path in ("/health", "/ping", "/info", "/metrics", "/v1/models"):
        assert httpx.get(url + path, timeout=30).status_code == 200, path

    # the official clients, with and without the key
    assert Client(url, headers=AUTH).generate("Hello", max_new_tokens=2).details.generated_tokens == 2
    with pytest.raises(requests.exceptions.JSONDecodeError):  # it reads the bare 401 as JSON, as against TGI
        Client(url).generate("Hello", max_new_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").completions.create(model="tgi", prompt="Hi", max_tokens=2)
    done = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY).completions.create(model="tgi", prompt="Hi", max_tokens=2)
    assert done.usage.completion_tokens == 2


def test_cors_answers_the_allowed_origin_only(stack):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,authorization"}
    allowed = httpx.options(f"{stack.http_url}/generate", headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = httpx.options(f"{stack.http_url}/generate", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    simple = httpx.post(f"{stack.http_url}/generate", json=BODY, headers={"Origin": ALLOWED_ORIGIN, **AUTH}, timeout=60)
    assert simple.status_code == 200 and simple.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


def _raw_request(port: int, head: bytes, body_chunks) -> tuple[bytes, int]:
    """Send a request on a raw socket, the body chunk by chunk until the server answers; returns the answer's
    first bytes and how many body bytes were sent before it came."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head)
        conn.settimeout(0.05)
        for chunk in body_chunks:
            try:
                answer = conn.recv(4096)
                if answer:
                    return answer, sent
            except socket.timeout:
                pass
            try:
                conn.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        conn.settimeout(10)
        return conn.recv(4096), sent


def test_payload_limit_refuses_large_bodies_without_reading_them(stack):
    port = int(stack.http_url.rsplit(":", 1)[1])
    big = httpx.post(f"{stack.http_url}/generate", content=b"x" * (PAYLOAD_LIMIT + 1), headers={"content-type": "application/json", **AUTH})
    assert big.status_code == 413 and b"--payload-limit" in big.content
    padded = b'{"inputs": "Hello", "parameters": {"max_new_tokens": 2}}' + b" " * (PAYLOAD_LIMIT - 100)
    assert httpx.post(f"{stack.http_url}/generate", content=padded, headers={"content-type": "application/json", **AUTH}, timeout=60).status_code == 200

    # a declared 100 MB body: refused from its headers, after a few KiB at most
    head = (
        f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
    ).encode()
    answer, sent = _raw_request(port, head, (b"x" * 1024 for _ in range(100_000)))
    assert answer.startswith(b"HTTP/1.1 413") and sent < 1_000_000, (answer[:40], sent)
    # a chunked body with no length: refused once it passes the limit
    head = (
        f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    answer, sent = _raw_request(port, head, (b"400\r\n" + b"x" * 1024 + b"\r\n" for _ in range(100_000)))
    assert answer.startswith(b"HTTP/1.1 413") and sent < 1_000_000, (answer[:40], sent)


def test_prometheus_port_serves_the_same_metrics(stack):
    metrics_url = f"http://127.0.0.1:{stack.prometheus_port}/metrics"
    httpx.post(f"{stack.http_url}/generate", json=BODY, headers=AUTH, timeout=60)
    text = httpx.get(metrics_url, timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["tgi_request_count"].type == "counter" and families["tgi_request_success"].samples[0].value >= 1
    assert "\ntgi_request_success " in text and "_total" not in text.replace("max_total_tokens", "")
    assert httpx.post(f"http://127.0.0.1:{stack.prometheus_port}/generate", json=BODY, timeout=30).status_code == 404


def test_chat_template_file_replaces_the_tokenizers(stack):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = httpx.post(f"{stack.http_url}/chat_tokenize", json={"messages": messages}, headers=AUTH, timeout=30)
    assert r.json()["templated_text"] == "<<system>>Be brief.\n<<user>>Hi\n<<assistant>>"


def test_traces_have_queue_and_infer_spans_with_prefill_chunks_and_decode_steps(stack, receiver):
    prompt = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    tokens = httpx.post(f"{stack.http_url}/tokenize", json={"inputs": prompt}, headers=AUTH, timeout=30).json()
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 4, "details": True}}
    r = httpx.post(f"{stack.http_url}/generate", json=body, headers=AUTH, timeout=60)
    assert r.json()["details"]["generated_tokens"] == 4
    spans = receiver.trace_of(len(tokens))
    by_id = {s.span_id: s for s in spans}
    (root,) = [s for s in spans if s.name == "generate"]
    (queue,) = [s for s in spans if s.name == "queue"]
    (infer,) = [s for s in spans if s.name == "infer"]
    assert queue.parent_span_id == root.span_id and infer.parent_span_id == root.span_id
    prefill = [s for s in spans if s.name == "prefill"]
    decode = [s for s in spans if s.name == "decode"]
    assert all(by_id[s.parent_span_id] is infer for s in prefill + decode)
    # the 12-token step budget splits the prompt into chunks; the last chunk gives the first token
    assert len(prefill) == -(-len(tokens) // 12) and sum(_attribute(s, "tokens") for s in prefill) == len(tokens)
    assert len(decode) == 3
    assert _attribute(root, "outcome") == "length" and _attribute(root, "generated_tokens") == 4
    assert queue.end_time_unix_nano <= infer.start_time_unix_nano <= infer.end_time_unix_nano <= root.end_time_unix_nano
    assert {service for service, span in receiver.spans if span.trace_id == root.trace_id} == {SERVICE_NAME}


def test_a_chat_template_that_does_not_compile_stops_the_router(tiny_internlm2_dir, tmp_path):
    from text_generation_router.cli import StartupError, load_tokenizer

    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }}")  # no endfor
    with pytest.raises(StartupError, match="broken.jinja does not compile"):
        load_tokenizer({"tokenizer_name": str(tiny_internlm2_dir), "chat_template": str(broken)}, 1000)


def test_no_tracing_without_an_endpoint():
    from text_generation_router.tracing import RequestTracer

    tracer = RequestTracer(None)
    assert not tracer.enabled  # Infer then makes no span; no exporter, no provider is set up
    tracer.shutdown()


def _standin_shard(tmp_path):
    """The benchmark's stand-in shard (it answers Info, Warmup and Step without a model) on a unix socket."""
    from text_generation_launcher.benchmark.router_alone import start_instant_shard

    return start_instant_shard([300, 301], 1000, [2], tmp_path / "standin-shard.log")


def _router_argv(tokenizer_dir, uds: str, port: int, grpc_port: int, metrics_port: int) -> list[str]:
    return [*ROUTER_CLI, "--master-shard-uds-path", uds, "--tokenizer-name", str(tokenizer_dir), "--hostname",
            "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port), "--prometheus-port", str(metrics_port),
            "--max-input-tokens", "100", "--max-total-tokens", "200"]


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_when_the_api_answers_metrics_and_grpc_listen_already(tiny_internlm2_dir, tmp_path):
    """The launcher calls the stack ready once the API's port answers: /metrics and the gRPC API open before it."""
    shard, uds = _standin_shard(tmp_path)
    port, grpc_port, metrics_port = free_ports(3)
    router = subprocess.Popen(_router_argv(tiny_internlm2_dir, uds, port, grpc_port, metrics_port))
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):
            assert router.poll() is None and time.monotonic() < deadline, "the router did not open its port"
            time.sleep(0.005)
        assert _listening(metrics_port) and _listening(grpc_port)
    finally:
        router.terminate()
        router.wait(30)
        shard.close()


@pytest.mark.parametrize("which", ["api", "grpc"])
def test_a_router_whose_port_is_taken_stops_at_once_and_frees_the_others(which, tiny_internlm2_dir, tmp_path):
    shard, uds = _standin_shard(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        metrics_port, other = free_ports(2, avoid={busy})
        port, grpc_port = (busy, other) if which == "api" else (other, busy)
        try:
            done = subprocess.run(_router_argv(tiny_internlm2_dir, uds, port, grpc_port, metrics_port),
                                  capture_output=True, text=True, timeout=60)
        finally:
            shard.close()
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    failed = {"api": "the HTTP server", "grpc": "the gRPC API"}[which]
    assert f"start-up failed: {failed} could not start on 127.0.0.1:{busy}" in output
    assert "Traceback" not in output
    assert not any(_listening(p) for p in (metrics_port, port, grpc_port) if p != busy)
