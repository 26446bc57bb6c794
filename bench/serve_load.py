"""`python -m app serve` under a burst of concurrent clients: latency, requests per second, memory.

    .venv/bin/python bench/serve_load.py                 # the latest run (make dpo first), 32 clients
    .venv/bin/python bench/serve_load.py --clients 64 --run exports/<run>

The server is the app's, in its own process, with an API key, on loopback. After one warm-up request the
clients start at once, half of them streaming, through the official openai client; each request asks for
up to --max-tokens tokens. The server answers one request at a time (llama-cpp-python's server), so the
latency of the last client is about the whole burst. RSS is the server's, from /proc, before and after.
"""
import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_section, context, format_table, load_average  # noqa: E402

KEY = "bench-key"
QUESTION = [{"role": "user", "content": "What is the sun?"}]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="latest", help="a run folder or name (default: latest)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    return p.parse_args()


def start_server(run: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app", "serve", str(run), "--quant", "f16", "--port", str(port)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PREFALIGN_API_KEY": KEY})
    url = f"http://127.0.0.1:{port}/v1"
    request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"})
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"the server exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(request, timeout=2).close()
            return proc, url
        except OSError:
            time.sleep(0.2)
    sys.exit("the server did not answer within 120 s")


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def ask(client, model: str, streaming: bool, max_tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens: counted as chunks when streaming)."""
    t0 = time.perf_counter()
    if streaming:
        chunks = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=max_tokens,
                                                stream=True)
        tokens = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    else:
        reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=max_tokens)
        tokens = reply.usage.completion_tokens
    return time.perf_counter() - t0, tokens


def main():
    from openai import OpenAI

    from app.runs import resolve_run
    args = parse_args()
    run = resolve_run(args.run)
    load_at_start = load_average()
    proc, url = start_server(run, Path(tempfile.mkdtemp(prefix="bench-serve-")) / "server.log")
    try:
        client = OpenAI(base_url=url, api_key=KEY, timeout=600, max_retries=0)
        model = client.models.list().data[0].id
        ask(client, model, False, args.max_tokens)  # warm-up: the model's buffers are allocated now
        before = rss_mib(proc.pid)
        results = [None] * args.clients

        def one(i):
            results[i] = ask(client, model, i % 2 == 1, args.max_tokens)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        after = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    latencies = sorted(seconds for seconds, _ in results)
    tokens = sum(n for _, n in results)
    pick = lambda q: latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))]  # noqa: E731
    table = format_table(["clients", "streaming", "wall s", "requests/s", "p50 s", "p95 s", "max s", "tokens/s",
                          "RSS before MiB", "RSS after MiB"],
                         [[args.clients, args.clients // 2, f"{wall:.2f}", f"{args.clients / wall:.1f}",
                           f"{pick(0.5):.2f}", f"{pick(0.95):.2f}", f"{latencies[-1]:.2f}", f"{tokens / wall:.0f}",
                           f"{before:.0f}", f"{after:.0f}"]])
    print(table)
    notes = [f"run {run.name}, its f16 GGUF, up to {args.max_tokens} tokens a reply, temperature 0; the server "
             f"answers one request at a time, so p50 is about half the burst and the slowest about all of it"]
    if not args.no_record:
        append_section(f"serve under {args.clients} concurrent clients (tiny)", context(load_at_start), table, notes)


if __name__ == "__main__":
    main()
