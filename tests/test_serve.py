"""`python -m app serve` on the tiny run, driven by the official openai client as any application would."""
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from app import ROOT

QUESTION = [{"role": "user", "content": "What is the sun?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc, url: str, log, timeout: float = 60) -> list:
    """The /v1/models listing once the server answers; fails with its stderr if it dies or never answers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
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
                                 "--port", str(port)], cwd=ROOT, stdout=out, stderr=err)
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
    return OpenAI(base_url=server[1], api_key="x", timeout=60, max_retries=0)


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


def test_server_exits_when_terminated(server):
    proc = server[0]
    proc.terminate()
    proc.wait(timeout=20)
    assert proc.returncode is not None
