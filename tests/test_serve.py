"""`python -m app serve` on the tiny run, driven by the official openai client as any application would:
answers, the API key, a bounded burst of concurrent clients, and a clean stop on SIGTERM."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from app import ROOT

QUESTION = [{"role": "user", "content": "What is the sun?"}]
KEY = "test-key-1234"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc, url: str, log, timeout: float = 60) -> list:
    """The /v1/models listing once the server answers; fails with its stderr if it dies or never answers."""
    deadline = time.time() + timeout
    request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"})
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                return json.loads(r.read())["data"]
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"the server did not answer within {timeout:.0f}s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """(process, base URL, the models it listed first); the log files are read only on failure."""
    port, logs = free_port(), tmp_path_factory.mktemp("serve")
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:  # files: a full pipe would block it
        proc = subprocess.Popen([sys.executable, "-m", "app", "serve", str(tiny_run), "--quant", "f16",
                                 "--port", str(port)], cwd=ROOT, stdout=out, stderr=err,
                                env={**os.environ, "PREFALIGN_API_KEY": KEY})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        yield proc, url, wait_until_up(proc, url, logs / "stderr")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server[1], api_key=KEY, timeout=60, max_retries=0)


def test_models_lists_the_run_by_name(server, client, tiny_run):
    assert [m["id"] for m in server[2]] == [tiny_run.name]
    assert [m.id for m in client.models.list()] == [tiny_run.name]


def test_chat_completion_answers_and_stops_at_eos(client, tiny_run):
    reply = client.chat.completions.create(model=tiny_run.name, messages=QUESTION, temperature=0, max_tokens=200)
    assert len(reply.choices[0].message.content.split()) >= 3, reply
    assert reply.choices[0].finish_reason == "stop"


def stream(client, model: str) -> tuple[str, str]:
    """(the text the chunks assemble into, the last finish_reason)."""
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=200,
                                                stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(pieces), finish


def test_streaming_chunks_assemble_into_the_reply(client, tiny_run):
    text, finish = stream(client, tiny_run.name)
    assert len(text.split()) >= 3 and finish == "stop", (text, finish)


def test_concurrent_requests_both_complete(client, tiny_run):
    """They queue; neither is cut short by the other (llama-cpp-python's default would end the first
    stream early as soon as the second request waits)."""
    results = [None, None]

    def ask(i):
        results[i] = stream(client, tiny_run.name)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert None not in results, results
    for text, finish in results:
        assert len(text.split()) >= 3 and finish == "stop", results


def test_without_the_key_every_request_gets_401(server, tiny_run):
    import openai
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=server[1], api_key=key or "-", timeout=30, max_retries=0).chat.completions.create(
                model=tiny_run.name, messages=QUESTION, max_tokens=8)
        assert e.value.status_code == 401
    request = urllib.request.Request(f"{server[1]}/models")  # no Authorization header at all
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 401


def test_exposure_verdict():
    from app.serve import exposure_verdict
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert exposure_verdict(host, None, False) == "local", host
    for host in ("0.0.0.0", "::", "192.168.1.5", "myhost.example"):
        assert exposure_verdict(host, None, False) == "refused", host
        assert exposure_verdict(host, "k", False) == "keyed", host
        assert exposure_verdict(host, None, True) == "open", host


def test_serving_beyond_loopback_without_a_key_is_refused_in_one_sentence(tiny_run):
    env = {k: v for k, v in os.environ.items() if k != "PREFALIGN_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "app", "serve", str(tiny_run), "--host", "0.0.0.0", "--port",
                           str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no API key" in lines[0] and "--insecure" in lines[0], proc.stderr


def rss_kib(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def test_a_burst_of_32_clients_is_answered_and_memory_returns(server, client, tiny_run):
    """32 at once, half streaming, one of them hanging up mid-stream: all others get complete answers, the
    next request is answered, and the server's RSS after the burst is within 10% of before (after a warm-up
    request, so the model's buffers are already there)."""
    import httpx

    proc = server[0]
    client.chat.completions.create(model=tiny_run.name, messages=QUESTION, temperature=0, max_tokens=48)
    before = rss_kib(proc.pid)
    results, latencies = {}, {}

    def ask(i):
        t0 = time.perf_counter()
        if i % 2:
            results[i] = stream(client, tiny_run.name)
        else:
            reply = client.chat.completions.create(model=tiny_run.name, messages=QUESTION, temperature=0,
                                                   max_tokens=200)
            results[i] = (reply.choices[0].message.content, reply.choices[0].finish_reason)
        latencies[i] = time.perf_counter() - t0

    def hang_up():
        body = {"model": tiny_run.name, "messages": QUESTION, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{server[1]}/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            next(r.iter_lines())  # the first chunk, then the connection is dropped

    t0 = time.perf_counter()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(32)] + [threading.Thread(target=hang_up)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - t0
    assert sorted(results) == list(range(32)), sorted(results)
    for text, finish in results.values():
        assert len(text.split()) >= 3 and finish == "stop", results
    after_burst = client.chat.completions.create(model=tiny_run.name, messages=QUESTION, temperature=0, max_tokens=48)
    assert after_burst.choices[0].message.content
    after = rss_kib(proc.pid)
    assert after <= 1.10 * before, (before, after)
    ordered = sorted(latencies.values())
    print(f"32 clients: {wall:.2f}s, {32 / wall:.1f} requests/s, p50 {ordered[15]:.2f}s, p95 {ordered[30]:.2f}s, "
          f"RSS {before / 1024:.0f} -> {after / 1024:.0f} MiB")


def test_sigterm_finishes_the_request_under_way_then_exits_0(server, tiny_run):
    """Last in this module: it stops the server. A request under way when SIGTERM comes gets its whole
    answer; then the process exits 0 (a service manager's stop is not a failure)."""
    from openai import OpenAI
    proc, url, _ = server
    slow = OpenAI(base_url=url, api_key=KEY, timeout=60, max_retries=0)
    answer = {}

    def ask():
        reply = slow.chat.completions.create(model=tiny_run.name, messages=QUESTION, temperature=0, max_tokens=200)
        answer["reply"] = reply

    thread = threading.Thread(target=ask)
    thread.start()
    time.sleep(0.3)  # the request is in
    proc.send_signal(signal.SIGTERM)
    thread.join(timeout=60)
    assert proc.wait(timeout=30) == 0
    reply = answer["reply"]
    assert reply.choices[0].finish_reason == "stop" and len(reply.choices[0].message.content.split()) >= 3
