"""python -m nanotune.bench.serve: does the server's throughput grow with its clients?

Starts `python -m nanotune.serve` on a free localhost port, then for 1, 2, 4 and 8 concurrent clients has each
client stream the same number of completions (greedy, a fixed number of tokens, a different book-like prompt
each) and measures the total generated tokens per second and the time to the first token, in --rounds rounds
(medians in the table). Clients and server share this machine's cores, as they would on a laptop.

    python -m nanotune.bench.serve --model weights/nano
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from ..flags import Parser, integer
from ..utils import die, save_json

PROMPTS = [
    "It was a dark and stormy night; the rain fell in torrents",
    "The captain looked at the sea and said",
    "In the morning the king called his ministers together",
    "She opened the letter with trembling hands",
    "We had not gone far along the road when",
    "My father had a small estate in Nottinghamshire",
    "The ship was ready to sail, and the crew",
    "Nobody in the village knew where the stranger",
]


def stream_one(port: int, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """One streamed completion -> (seconds to the first text, seconds in all, tokens generated)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, first, tokens = time.perf_counter(), None, 0
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"the server answered {response.status}: {response.read()[:300]!r}")
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    connection.close()
    return first if first is not None else float("nan"), time.perf_counter() - start, tokens


def measure(port: int, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """clients threads, each streaming `requests` completions one after another."""
    results, errors = [], []

    def client(i: int):
        try:
            for r in range(requests):
                results.append(stream_one(port, model, PROMPTS[(i + r) % len(PROMPTS)], max_tokens))
        except Exception as e:  # (reported by the caller)
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{clients} clients: {errors[0]}")
    tokens = sum(r[2] for r in results)
    return {
        "clients": clients,
        "tokens": tokens,
        "seconds": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_median_s": round(statistics.median(r[0] for r in results), 3),
        "ttft_max_s": round(max(r[0] for r in results), 3),
    }


def start_server(args) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "nanotune.serve", "--model", args.model, "--name", "bench", "--port", str(port)]
    cmd += ["--max-batch", str(max(args.clients)), "--dtype", args.dtype]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(1200):
        if server.poll() is not None:
            die(f"the server exited: {(server.stderr.read().strip().splitlines() or ['(no output)'])[-1]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server, port
        except OSError:
            time.sleep(0.1)
    server.kill()
    die("the server did not come up within 120 s")


def main(argv=None):
    """python -m nanotune.bench.serve: tokens/s and time to first token with 1, 2, 4, 8 concurrent clients.

    python -m nanotune.bench.serve --model weights/nano
    """
    p = Parser(main.__doc__, prog="python -m nanotune.bench.serve")
    p.add_argument("--model", default="weights/nano", help="what the server serves (default weights/nano)")
    p.add_argument("--clients", type=integer(1), nargs="+", default=[1, 2, 4, 8], help="client counts to try")
    p.add_argument("--requests", type=integer(1), default=3, help="completions per client (default 3)")
    p.add_argument("--rounds", type=integer(1), default=3, help="rounds over the client counts; medians (default 3)")
    p.add_argument("--max-tokens", type=integer(1), default=64, help="tokens per completion (default 64)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the server's --dtype")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    server, port = start_server(args)
    runs = {clients: [] for clients in args.clients}
    try:
        stream_one(port, "bench", PROMPTS[0], 8)  # warm up: the first request pays for allocations
        for round_ in range(args.rounds):  # each client count once a round, so a slow spell hits them all
            for clients in args.clients:
                r = measure(port, "bench", clients, args.requests, args.max_tokens)
                runs[clients].append(r)
                ttft = f"time to first token median {r['ttft_median_s']} s, max {r['ttft_max_s']} s"
                print(
                    f"round {round_ + 1}: {clients} clients: {r['tokens_per_s']} tok/s ({r['tokens']} tokens in "
                    f"{r['seconds']} s), {ttft}",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(timeout=30)
    rows = []
    for clients, results in runs.items():
        median = {k: statistics.median(r[k] for r in results) for k in ("tokens_per_s", "ttft_median_s")}
        rows.append({"clients": clients, **median, "rounds": results})
    base = rows[0]["tokens_per_s"]
    print("\n| clients | tokens/s | x one client | time to first token (median) |\n|---|---|---|---|")
    for r in rows:
        r["speedup"] = round(r["tokens_per_s"] / base, 2)
        print(f"| {r['clients']} | {r['tokens_per_s']:.1f} | {r['speedup']} | {r['ttft_median_s'] * 1000:.0f} ms |")
    if args.out:
        save_json(Path(args.out), {"model": args.model, "max_tokens": args.max_tokens, "results": rows})


if __name__ == "__main__":
    main()
