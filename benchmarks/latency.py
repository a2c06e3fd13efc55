"""An API one region away: 100 concurrent span creates through one client.

    benchmarks/.venv/bin/python benchmarks/latency.py [--quick]

A keep-alive HTTP/1.1 server on loopback answers every request after 50 ms, so 100
calls in flight can reach at most 2,000 calls/s. Each client runs in a fresh process
with 100 calls in flight at all times (100 tasks or threads, each sending one span
create after another), first one call each to open the connections, then CALLS
calls timed. The targets take turns round by round; medians from this one run.

- ours, async: this repo's ``AsyncPrefactorHttpClient`` (100 asyncio tasks)
- ours, 100 threads: this repo's ``PrefactorHttpClient`` shared by 100 threads
- upstream 0.1.0: the async ``prefactor-http`` from benchmarks/requirements.txt
- upstream 0.4.3: where installed beside it (it needs Python 3.11+):
  ``benchmarks/.venv/bin/pip install --no-deps --target benchmarks/.venv/upstream-0.4.3 prefactor-http==0.4.3``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
UPSTREAM_043 = os.path.join(HERE, ".venv", "upstream-0.4.3")
DELAY = 0.050
CONCURRENCY = 100
TOKEN = "bench-token"
PAYLOAD = {"model": "demo-model", "prompt": "What is 6 x 7?"}
LABELS = {
    "ours-async": "prefactor_http AsyncPrefactorHttpClient (this file)",
    "ours-threads": "prefactor_http PrefactorHttpClient, 100 threads (this file)",
    "upstream-0.1.0": "prefactor-http 0.1.0 (aiohttp)",
    "upstream-0.4.3": "prefactor-http 0.4.3 (aiohttp)",
}


def response_bytes() -> bytes:
    sys.path.insert(0, HERE)
    from bench import SPAN  # the same canned span as the other benchmarks

    body = json.dumps({"status": "success", "details": SPAN}).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def start_server() -> str:
    """The slow API, on a thread of this (otherwise idle) driver process."""
    answer = response_bytes()
    ready: list[str] = []
    started = threading.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        await reader.readexactly(int(line[15:]))
                await asyncio.sleep(DELAY)
                writer.write(answer)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        ready.append(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        started.set()
        await server.serve_forever()

    threading.Thread(target=asyncio.run, args=(serve(),), daemon=True).start()
    started.wait(10)
    return ready[0]


# --------------------------------------------------------------------------- #
# Worker: one measurement in a fresh process; prints calls/s
# --------------------------------------------------------------------------- #


async def run_async(create, calls: int) -> float:  # type: ignore[no-untyped-def]
    async def worker(count: int) -> None:
        for _ in range(count):
            await create()

    await asyncio.gather(*(worker(1) for _ in range(CONCURRENCY)))  # warm-up: opens the connections
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(calls // CONCURRENCY) for _ in range(CONCURRENCY)))
    return calls // CONCURRENCY * CONCURRENCY / (time.perf_counter() - t0)


def measure(target: str, url: str, calls: int) -> float:
    if target.startswith("ours"):
        sys.path.insert(0, ROOT)
        import prefactor_http as p

        assert p.__file__.startswith(ROOT + os.sep), p.__file__
        config = p.HttpClientConfig(api_url=url, api_token=TOKEN, trust_env=False)
        if target == "ours-async":

            async def main() -> float:
                async with p.AsyncPrefactorHttpClient(config) as client:
                    return await run_async(
                        lambda: client.agent_spans.create("inst-1", "agent:llm", "active", PAYLOAD), calls
                    )

            return asyncio.run(main())
        client = p.PrefactorHttpClient(config)
        per_thread = calls // CONCURRENCY

        def burst(count: int) -> None:
            def work() -> None:
                for _ in range(count):
                    client.agent_spans.create("inst-1", "agent:llm", "active", PAYLOAD)

            threads = [threading.Thread(target=work) for _ in range(CONCURRENCY)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        burst(1)  # warm-up: opens the connections
        t0 = time.perf_counter()
        burst(per_thread)
        return per_thread * CONCURRENCY / (time.perf_counter() - t0)
    import prefactor_http as up

    version = target.split("-")[1]
    assert getattr(up, "__version__", "0.1.0") == version, (up.__file__, version)

    async def main_upstream() -> float:
        async with up.PrefactorHttpClient(up.HttpClientConfig(api_url=url, api_token=TOKEN)) as client:
            return await run_async(lambda: client.agent_spans.create("inst-1", "agent:llm", "active", PAYLOAD), calls)

    return asyncio.run(main_upstream())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of fewer calls: a smoke run")
    parser.add_argument("--worker", nargs=3, metavar=("TARGET", "URL", "CALLS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        target, url, calls = args.worker
        print(measure(target, url, int(calls)))
        return 0
    targets = ["ours-async", "upstream-0.1.0", "ours-threads"]
    if os.path.isdir(UPSTREAM_043):
        targets.insert(2, "upstream-0.4.3")
    rounds, calls = (1, 1000) if args.quick else (3, 3000)
    url = start_server()
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("PREFACTOR_")}
    results: dict[str, list[float]] = {t: [] for t in targets}
    for _ in range(rounds):
        for target in targets:
            run_env = {**env, "PYTHONPATH": UPSTREAM_043} if target == "upstream-0.4.3" else env
            out = subprocess.run(
                [sys.executable, __file__, "--worker", target, url, str(calls)],
                env=run_env, cwd=HERE, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            if out.returncode != 0:
                raise SystemExit(f"{target} failed:\n{out.stderr}")
            results[target].append(float(out.stdout))
    med = {t: statistics.median(v) for t, v in results.items()}
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; the server answers after {DELAY * 1000:.0f} ms")
    print(
        f"{CONCURRENCY} calls in flight (ceiling {CONCURRENCY / DELAY:,.0f} calls/s); median of {rounds} runs of {calls} calls\n"
    )
    uppers = [t for t in targets if t.startswith("upstream")]
    print("| client | calls/s | " + " | ".join(f"÷ {LABELS[u].split(' (')[0]}" for u in uppers) + " |")
    print("|---|---|" + "---|" * len(uppers))
    for t in targets:
        ratios = " | ".join(f"{med[t] / med[u]:.2f}" for u in uppers)
        print(f"| {LABELS[t]} | {med[t]:,.0f} | {ratios} |")
    print("\nruns (calls/s): " + "; ".join(f"{t} " + ", ".join(f"{x:,.0f}" for x in v) for t, v in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
