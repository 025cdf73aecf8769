"""End to end: target service, draft service and orchestrator as three real processes on
loopback, driven by a Python grpcio client built from our .proto files (a foreign client).

Checks: health of all three; greedy, speculative, Ouroboros and trie give the same tokens
through the public API; streaming gives the unary text; a bad request gets
INVALID_ARGUMENT; SIGTERM stops all three cleanly.

usage: three_processes.py BIN_DIR MODEL_DIR   (run by tests/e2e/run.sh)
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stubs(out):
    proto_dir = os.path.join(ROOT, "proto", "proto")
    files = ["ouroboros/common/v1/common.proto", "ouroboros/v1/generate.proto"]
    args = ["protoc", f"-I{proto_dir}", f"-I{os.path.dirname(protoc.__file__)}/_proto",
            f"--python_out={out}", f"--grpc_python_out={out}", *files]
    if protoc.main(args) != 0:
        sys.exit("grpc_tools.protoc failed")
    sys.path.insert(0, out)
    from ouroboros.v1 import generate_pb2, generate_pb2_grpc
    return generate_pb2, generate_pb2_grpc


def wait_serving(addr, proc, what, limit=300):
    deadline = time.time() + limit
    with grpc.insecure_channel(addr) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        while time.time() < deadline:
            if proc.poll() is not None:
                sys.exit(f"{what} exited with {proc.returncode} before serving")
            try:
                r = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    sys.exit(f"{what} not serving after {limit} s")


def main():
    bins, models = sys.argv[1], sys.argv[2]
    model = os.path.join(models, "qwen2.5-coder-0.5b-instruct.gguf")
    tokenizer = os.path.join(models, "qwen-tokenizer.json")
    pt, pd, po, pm = free_port(), free_port(), free_port(), free_port()
    env = dict(os.environ, RUST_LOG="warn")
    procs = {
        "target": subprocess.Popen([f"{bins}/target-service", "--model", model,
                                    "--listen", f"127.0.0.1:{pt}"], env=env),
        "draft": subprocess.Popen([f"{bins}/draft-service", "--model", model,
                                   "--listen", f"127.0.0.1:{pd}"], env=env),
    }
    try:
        wait_serving(f"127.0.0.1:{pt}", procs["target"], "target-service")
        wait_serving(f"127.0.0.1:{pd}", procs["draft"], "draft-service")
        procs["orchestrator"] = subprocess.Popen(
            [f"{bins}/ouro", "serve", "--listen", f"127.0.0.1:{po}",
             "--target-endpoint", f"http://127.0.0.1:{pt}",
             "--draft-endpoint", f"http://localhost:{pd}",
             "--tokenizer", tokenizer, "--level", "4", "--window", "2", "--guess", "2",
             "--gamma", "4", "--metrics-listen", f"127.0.0.1:{pm}"], env=env)
        wait_serving(f"127.0.0.1:{po}", procs["orchestrator"], "ouro serve")
        with tempfile.TemporaryDirectory() as gen:
            pb, pb_grpc = stubs(gen)
            check_api(pb, pb_grpc, f"127.0.0.1:{po}")
        check_metrics(f"http://127.0.0.1:{pm}/metrics")
        # SIGTERM: every process drains and exits 0.
        for name in ("orchestrator", "draft", "target"):
            p = procs[name]
            p.send_signal(signal.SIGTERM)
            code = p.wait(timeout=90)
            assert code == 0, f"{name} exited with {code} after SIGTERM"
        print("three-process end-to-end test passed")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()


def check_metrics(url):
    page = urllib.request.urlopen(url, timeout=10).read().decode()
    values = {}
    for line in page.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    key = 'ouro_spec_decode_num_accepted_tokens_total{strategy="ouroboros"}'
    assert values.get(key, 0) > 0, f"{key} missing or zero in:\n{page}"
    assert values.get('ouro_requests_total{finish="length",strategy="greedy"}', 0) >= 2
    assert values.get('ouro_time_to_first_token_seconds_count{strategy="ouroboros"}', 0) > 0


def check_api(pb, pb_grpc, addr):
    with grpc.insecure_channel(addr) as ch:
        api = pb_grpc.OuroborosStub(ch)
        prompts = ["def fibonacci(n):", "# Sort a list of numbers in Python\n"]
        for prompt in prompts:
            def run(strategy):
                r = pb.GenerateRequest(prompt=prompt, max_new_tokens=24, strategy=strategy)
                return api.Generate(r, timeout=300)
            greedy = run(pb.STRATEGY_GREEDY)
            assert len(greedy.token_ids) > 0 and greedy.text
            assert greedy.usage.completion_tokens == len(greedy.token_ids)
            for s in (pb.STRATEGY_SPECULATIVE, pb.STRATEGY_OUROBOROS, pb.STRATEGY_TRIE,
                      pb.STRATEGY_AUTO):
                g = run(s)
                assert list(g.token_ids) == list(greedy.token_ids), \
                    f"{pb.Strategy.Name(s)} differs from greedy on {prompt!r}"
                assert g.text == greedy.text
                # The orchestrator profiled its backends at start, so auto runs as auto.
                assert s != pb.STRATEGY_AUTO or g.stats.strategy == "auto", g.stats.strategy
            ouro = run(pb.STRATEGY_OUROBOROS)
            # The same model drafts: speculation must save target forwards.
            assert ouro.stats.target_forwards < greedy.stats.target_forwards, \
                (ouro.stats.target_forwards, greedy.stats.target_forwards)
            assert ouro.stats.draft_fallback == ""
            # Streaming carries exactly the unary text, and ends with the finish reason.
            req = pb.GenerateRequest(prompt=prompt, max_new_tokens=24,
                                     strategy=pb.STRATEGY_OUROBOROS)
            parts = list(api.GenerateStream(req, timeout=300))
            assert "".join(p.text for p in parts) == greedy.text
            ids = [t for p in parts for t in p.token_ids]
            assert ids == list(greedy.token_ids)
            assert parts[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        # Chat goes through the model's own template, which the orchestrator got from the
        # target service's Info (it was given only a tokenizer.json): Qwen's adds its
        # default system prompt.
        chat = pb.GenerateRequest(
            chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Say hi.")]),
            max_new_tokens=8, strategy=pb.STRATEGY_GREEDY)
        rendered = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
                    "helpful assistant.<|im_end|>\n<|im_start|>user\nSay hi.<|im_end|>\n"
                    "<|im_start|>assistant\n")
        plain = pb.GenerateRequest(prompt=rendered, max_new_tokens=8,
                                   strategy=pb.STRATEGY_GREEDY)
        a, b = api.Generate(chat, timeout=300), api.Generate(plain, timeout=300)
        assert a.usage.prompt_tokens == b.usage.prompt_tokens, (a.usage, b.usage)
        assert list(a.token_ids) == list(b.token_ids) and a.text, (a.text, b.text)
        try:
            api.Generate(pb.GenerateRequest(prompt="x", max_new_tokens=0), timeout=30)
            raise AssertionError("max_new_tokens=0 was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.code()
            assert "max_new_tokens" in e.details()


if __name__ == "__main__":
    main()
