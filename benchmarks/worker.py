"""One benchmark measurement in a fresh process: ``worker.py MODE TARGET URL [N]``.

Kept to ``sys``/``os`` at the top so a cold start measures the client, not this file.
Modes: ``cold`` (import, build, first call), ``import`` (import only), ``mem`` (200
calls, then VmHWM), ``seq`` (latencies of N calls after a warm-up), ``threads``
(8 threads sharing one client, N calls in all), ``bulk`` (client CPU per span for N
spans: one call each, chunks of 100, chunks of 500).
Each target sends the same span-create body and decodes the JSON reply.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "bench-token"
SPAN_DETAILS = {
    "agent_instance_id": "inst-1",
    "schema_name": "agent:llm",
    "status": "active",
    "payload": {"model": "demo-model", "prompt": "What is 6 x 7?"},
}
KEY = "7d0e2c9a-9d55-4a47-9f3c-2b7d2f0e8a11"


def generic_request():
    """Path, pre-built body and headers for the generic clients and the floor."""
    import json

    body = json.dumps({"details": {**SPAN_DETAILS, "idempotency_key": KEY}, "idempotency_key": KEY}).encode()
    headers = {
        "Authorization": "Bearer " + TOKEN,
        "Accept": "application/json",
        "Content-Type": "application/json",
        "X-Prefactor-SDK": "bench@0",
    }
    return "/api/v1/agent_spans", body, headers


# --------------------------------------------------------------------------- #
# Targets: each returns (call, close); call() sends one span create.
# --------------------------------------------------------------------------- #


def ours_folder(target):
    """BENCH_OURS: a copy of prefactor_http.py, compiled (.pyc); "ours-nopyc" is the
    same file without a .pyc, "ours-base" an earlier revision (bench.py --baseline)."""
    return os.environ[{"ours-nopyc": "BENCH_OURS_SRC", "ours-base": "BENCH_OURS_BASE"}.get(target, "BENCH_OURS")]


def target_ours(url):
    folder = ours_folder(sys.argv[2])
    sys.path.insert(0, folder)
    import prefactor_http as p

    assert p.__file__.startswith(folder), p.__file__
    client = p.PrefactorHttpClient(p.HttpClientConfig(api_url=url, api_token=TOKEN, trust_env=False))
    spans = client.agent_spans

    def call():
        return spans.create("inst-1", "agent:llm", "active", SPAN_DETAILS["payload"])

    def bulk(items):
        return client.bulk.execute(items)

    call.bulk = bulk
    return call, client.close


def target_floor(url):
    import http.client
    import json
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    path, body, headers = generic_request()
    path = parts.path + path
    if parts.scheme == "https":
        import ssl

        conn = http.client.HTTPSConnection(parts.hostname, parts.port, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port)

    def call():
        conn.request("POST", path, body, headers)
        return json.loads(conn.getresponse().read())

    return call, conn.close


def target_urllib(url):
    import json
    import urllib.request

    path, body, headers = generic_request()

    def call():
        request = urllib.request.Request(url + path, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request) as response:
            return json.loads(response.read())

    return call, lambda: None


def target_requests(url):
    import requests

    path, body, headers = generic_request()
    session = requests.Session()

    def call():
        return session.post(url + path, data=body, headers=headers).json()

    return call, session.close


def target_httpx(url):
    import httpx

    path, body, headers = generic_request()
    client = httpx.Client()

    def call():
        return client.post(url + path, content=body, headers=headers).json()

    return call, client.close


class Upstream:
    """The async prefactor-http package, driven from one event loop."""

    def __init__(self, url):
        import asyncio

        from prefactor_http import HttpClientConfig, PrefactorHttpClient

        assert "site-packages" in sys.modules["prefactor_http"].__file__, "the async package, not this repo's file"
        self.asyncio = asyncio
        self.loop = asyncio.new_event_loop()
        self.client = PrefactorHttpClient(HttpClientConfig(api_url=url, api_token=TOKEN))
        self.loop.run_until_complete(self.client.__aenter__())

    async def call(self):
        return await self.client.agent_spans.create("inst-1", "agent:llm", "active", SPAN_DETAILS["payload"])

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def close(self):
        self.run(self.client.close())
        self.loop.close()


TARGETS = {
    "ours": target_ours,
    "ours-nopyc": target_ours,
    "ours-base": target_ours,
    "floor": target_floor,
    "urllib": target_urllib,
    "requests": target_requests,
    "httpx": target_httpx,
}


# --------------------------------------------------------------------------- #
# Modes
# --------------------------------------------------------------------------- #


def do_import(target, url):
    if target.startswith("ours"):
        sys.path.insert(0, ours_folder(target))
        import prefactor_http
    elif target == "upstream":
        import prefactor_http  # noqa: F401
    elif target == "floor":
        import http.client  # noqa: F401
        import json  # noqa: F401
    elif target == "urllib":
        import urllib.request  # noqa: F401
    else:
        __import__(target)


def do_cold(target, url):
    if target == "upstream":
        upstream = Upstream(url)
        upstream.run(upstream.call())
        return
    call, _ = TARGETS[target](url)
    call()


def do_mem(target, url):
    if target == "upstream":
        upstream = Upstream(url)

        async def many():
            for _ in range(200):
                await upstream.call()

        upstream.run(many())
    else:
        call, _ = TARGETS[target](url)
        for _ in range(200):
            call()
    with open("/proc/self/status") as f:
        print(next(line.split()[1] for line in f if line.startswith("VmHWM")))


def do_seq(target, url, n):
    from time import perf_counter

    samples = []
    if target == "upstream":
        upstream = Upstream(url)

        async def timed():
            for i in range(n + 200):
                t0 = perf_counter()
                await upstream.call()
                if i >= 200:
                    samples.append(perf_counter() - t0)

        upstream.run(timed())
    else:
        call, _ = TARGETS[target](url)
        for i in range(n + 200):
            t0 = perf_counter()
            call()
            if i >= 200:
                samples.append(perf_counter() - t0)
    print(" ".join(f"{s * 1e6:.1f}" for s in samples))


def do_threads(target, url, n):
    import threading
    from time import perf_counter

    per_thread = n // 8
    if target == "upstream":
        upstream = Upstream(url)

        async def burst():
            async def worker():
                for _ in range(per_thread):
                    await upstream.call()

            await upstream.asyncio.gather(*[worker() for _ in range(8)])

        upstream.run(burst())  # warm-up: opens the connections
        t0 = perf_counter()
        upstream.run(burst())
        print(per_thread * 8 / (perf_counter() - t0))
        return
    local = threading.local()
    shared = None if target == "floor" else TARGETS[target](url)[0]

    def work():
        call = shared or getattr(local, "call", None)
        if call is None:
            call = local.call = TARGETS[target](url)[0]  # the floor: one connection per thread
        for _ in range(per_thread):
            call()

    def burst():
        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    burst()  # warm-up: opens the connections
    t0 = perf_counter()
    burst()
    print(per_thread * 8 / (perf_counter() - t0))


def do_bulk(target, url, n):
    """CPU seconds per span: one create per span, then bulk chunks of 100 and 500."""
    from time import process_time

    call, _ = TARGETS[target](url)
    for _ in range(50):
        call()
    results = []
    t0 = process_time()
    for _ in range(n):
        call()
    results.append((process_time() - t0) / n)
    for size in (100, 500):
        bulk_call, _ = TARGETS[target](f"{url}/b{size}")
        items = [
            {"_type": "agent_spans/create", "idempotency_key": f"bulk-key-{i:06d}", **SPAN_DETAILS} for i in range(n)
        ]
        bulk_call.bulk(items[:size])
        t0 = process_time()
        for start in range(0, n, size):
            bulk_call.bulk(items[start : start + size])
        results.append((process_time() - t0) / n)
    print(" ".join(f"{r * 1e6:.2f}" for r in results))


def main():
    mode, target, url = sys.argv[1:4]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    if mode == "import":
        do_import(target, url)
    elif mode == "cold":
        do_cold(target, url)
    elif mode == "mem":
        do_mem(target, url)
    elif mode == "seq":
        do_seq(target, url, n)
    elif mode == "threads":
        do_threads(target, url, n)
    elif mode == "bulk":
        do_bulk(target, url, n)


if __name__ == "__main__":
    main()
