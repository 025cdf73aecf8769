"""End to end: target service, draft service and orchestrator as three real processes on
loopback, driven by a Python grpcio client built from our .proto files (a foreign client).

Checks: an orchestrator whose tokenizer is not the services' vocabulary refuses to start,
naming both; health of all three; greedy, speculative, Ouroboros and trie give the same
tokens through the public API; streaming gives the unary text; a bad request gets
INVALID_ARGUMENT with a google.rpc.BadRequest naming the field; reflection answers v1alpha
clients; the OpenAI-compatible HTTP API, called with the official `openai` package and
curl, gives the gRPC text, streams it as server-sent events, draws seeds that reproduce,
and answers bad requests with 400 naming the parameter; SIGTERM stops all three cleanly.

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
    # The orchestrator builds its tokenizer from (a local copy of) the target's file.
    tokenizer = model
    pt, pd, po, pm, ph = free_port(), free_port(), free_port(), free_port(), free_port()
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
        # Another family's tokenizer (SmolLM2's), and a Qwen tokenizer.json whose tool
        # tokens the Coder model lacks: both refused at start, naming both sides.
        for wrong in ("smollm2-135m-instruct-q4_1.gguf", "qwen-tokenizer.json"):
            check_refused(bins, env, pt, pd, os.path.join(models, wrong))
        procs["orchestrator"] = subprocess.Popen(
            [f"{bins}/ouro", "serve", "--listen", f"127.0.0.1:{po}",
             "--target-endpoint", f"http://127.0.0.1:{pt}",
             "--draft-endpoint", f"http://localhost:{pd}",
             "--tokenizer", tokenizer, "--level", "4", "--window", "2", "--guess", "2",
             "--gamma", "4", "--metrics-listen", f"127.0.0.1:{pm}",
             "--http-listen", f"127.0.0.1:{ph}"], env=env)
        wait_serving(f"127.0.0.1:{po}", procs["orchestrator"], "ouro serve")
        with tempfile.TemporaryDirectory() as gen:
            pb, pb_grpc = stubs(gen)
            check_api(pb, pb_grpc, f"127.0.0.1:{po}")
            check_grpc_conventions(pb, pb_grpc, f"127.0.0.1:{po}")
            check_openai(pb, pb_grpc, f"127.0.0.1:{po}", f"http://127.0.0.1:{ph}")
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


def check_refused(bins, env, pt, pd, tokenizer):
    p = subprocess.run(
        [f"{bins}/ouro", "serve", "--listen", f"127.0.0.1:{free_port()}",
         "--target-endpoint", f"http://127.0.0.1:{pt}",
         "--draft-endpoint", f"http://127.0.0.1:{pd}", "--tokenizer", tokenizer,
         "--skip-profile"],
        env=dict(env, RUST_BACKTRACE="0"), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0, f"ouro serve started with {tokenizer}"
    name = os.path.basename(tokenizer)
    assert name in p.stderr and "target service" in p.stderr, p.stderr
    print(f"refused at start with {name}: {p.stderr.strip().splitlines()[-1]}")


def check_grpc_conventions(pb, pb_grpc, addr):
    """Reflection through v1alpha (grpcio-reflection's client speaks only that) and
    BadRequest details decoded by grpcio-status."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from google.rpc import error_details_pb2
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
        ProtoReflectionDescriptorDatabase
    from grpc_status import rpc_status
    with grpc.insecure_channel(addr) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = db.get_services()
        assert "ouroboros.v1.Ouroboros" in services, services
        method = DescriptorPool(db).FindServiceByName("ouroboros.v1.Ouroboros") \
            .FindMethodByName("Generate")
        assert method.input_type.full_name == "ouroboros.v1.GenerateRequest"
        api = pb_grpc.OuroborosStub(ch)
        try:
            api.Generate(pb.GenerateRequest(prompt="x", max_new_tokens=0), timeout=30)
            raise AssertionError("max_new_tokens=0 was accepted")
        except grpc.RpcError as e:
            status = rpc_status.from_call(e)
            assert status is not None, "no rich status details"
            bad = error_details_pb2.BadRequest()
            assert status.details[0].Unpack(bad), status.details
            assert bad.field_violations[0].field == "max_new_tokens", bad
        # Info, Tokenize and Detokenize.
        info = api.Info(pb.InfoRequest(), timeout=30)
        assert info.model == "qwen2.5-coder-0.5b-instruct.gguf", info.model
        assert info.draft_model and info.context_length > 0, info
        assert pb.STRATEGY_OUROBOROS in info.strategies
        assert len(info.verify_costs) > 0, "the orchestrator profiled its backends at start"
        ids = api.Tokenize(pb.TokenizeRequest(text="def fibonacci(n):"), timeout=30).token_ids
        text = api.Detokenize(pb.DetokenizeRequest(token_ids=ids), timeout=30).text
        assert text == "def fibonacci(n):", text


def check_openai(pb, pb_grpc, grpc_addr, base):
    """The HTTP API with the official openai package, against gRPC Generate."""
    import openai
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=300)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    with grpc.insecure_channel(grpc_addr) as ch:
        api = pb_grpc.OuroborosStub(ch)
        chat = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in messages])
        want = api.Generate(pb.GenerateRequest(chat=chat, max_new_tokens=64,
                                               strategy=pb.STRATEGY_GREEDY), timeout=300)
        plain = api.Generate(pb.GenerateRequest(prompt="def fibonacci(n):", max_new_tokens=24,
                                                strategy=pb.STRATEGY_GREEDY), timeout=300)
    stream = client.chat.completions.create(
        model=model, messages=messages, stream=True, temperature=0, max_tokens=64,
        stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for c in stream:
        if c.choices:
            text += c.choices[0].delta.content or ""
            finish = c.choices[0].finish_reason or finish
        if c.usage:
            usage = c.usage
    assert text == want.text, (text, want.text)
    assert usage.completion_tokens == want.usage.completion_tokens, usage
    assert usage.prompt_tokens == want.usage.prompt_tokens, usage
    assert finish == ("length" if want.finish_reason == pb.FINISH_REASON_LENGTH else "stop")
    for strategy in ("speculative", "trie", "ouroboros"):
        r = client.completions.create(model=model, prompt="def fibonacci(n):", max_tokens=24,
                                      temperature=0, extra_body={"strategy": strategy})
        assert r.choices[0].text == plain.text, (strategy, r.choices[0].text, plain.text)
        assert r.model_dump()["ouroboros"]["strategy"] == strategy
    # Log-probabilities with 5 alternatives: the same under every strategy (the target's
    # rows do not depend on the tree they were computed in), and under greedy the chosen
    # token is the most likely one.
    lps = {}
    for strategy in ("greedy", "speculative", "trie", "ouroboros"):
        r = client.completions.create(model=model, prompt="def fibonacci(n):", max_tokens=24,
                                      temperature=0, logprobs=5,
                                      extra_body={"strategy": strategy})
        lps[strategy] = r.choices[0].logprobs
        assert r.choices[0].text == plain.text
    want_lp = lps["greedy"]
    assert len(want_lp.token_logprobs) == 24
    for chosen, top in zip(want_lp.token_logprobs, want_lp.top_logprobs):
        assert len(top) == 5 and chosen == max(top.values()), (chosen, top)
    for strategy, lp in lps.items():
        assert lp.tokens == want_lp.tokens, strategy
        assert all(abs(a - b) <= 1e-5
                   for a, b in zip(lp.token_logprobs, want_lp.token_logprobs)), strategy
    # Unseeded sampled requests draw different seeds; each replays to its own text.
    drawn = [client.completions.create(model=model, prompt="Once upon a time", max_tokens=16,
                                       temperature=1.0) for _ in range(2)]
    seeds = [d.model_dump()["seed"] for d in drawn]
    assert seeds[0] != seeds[1], seeds
    for d, seed in zip(drawn, seeds):
        again = client.completions.create(model=model, prompt="Once upon a time",
                                          max_tokens=16, temperature=1.0, seed=seed)
        assert again.choices[0].text == d.choices[0].text, seed
    try:
        client.completions.create(model=model, prompt="x", max_tokens=-1)
        raise AssertionError("max_tokens=-1 was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert e.body["param"] == "max_tokens", e.body
    # curl -N sees the raw events.
    out = subprocess.run(
        ["curl", "-sN", f"{base}/v1/chat/completions", "-H", "content-type: application/json",
         "-d", '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, '
               '"stream": true, "temperature": 0}'],
        capture_output=True, text=True, timeout=300, check=True).stdout
    lines = [line for line in out.splitlines() if line]
    assert lines[0].startswith("data: {") and lines[-1] == "data: [DONE]", out
    health = urllib.request.urlopen(f"{base}/health", timeout=10)
    assert health.status == 200
    print("OpenAI-compatible HTTP API: chat stream, completions, logprobs, seeds, errors, SSE ok")


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
        # target service's Info (not from the file it took its tokenizer from): Qwen's adds its
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
