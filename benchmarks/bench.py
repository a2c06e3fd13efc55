"""Compare prefactor_http with other clients, side by side, in one run.

    benchmarks/.venv/bin/python benchmarks/bench.py [--quick] [--baseline REV]

Needs nginx and openssl on PATH and the packages in benchmarks/requirements.txt
(see the README). It makes a loopback certificate, starts nginx answering canned
JSON on HTTP and HTTPS, and runs every measurement in fresh worker processes,
interleaving the targets round by round so machine noise falls on all of them
alike. It reports medians and ratios from this one run; nginx is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "worker.py")
TARGETS = ["ours", "floor", "upstream", "urllib", "requests", "httpx"]
COLD_TARGETS = [*TARGETS, "ours-nopyc"]
LABELS = {
    "ours": "prefactor_http (this file)",
    "ours-nopyc": "prefactor_http, no .pyc (compiled at start)",
    "floor": "floor: raw http.client keep-alive",
    "upstream": "prefactor-http 0.1.0 (async)",
    "urllib": "urllib.request per call",
    "requests": "requests.Session",
    "httpx": "httpx.Client",
}

SPAN = {
    "type": "agent_span",
    "id": "06h2m52mb31jw8ssrefngs1pbrsfdd9h",
    "account_id": "06h2m4z1waz3bgjbhkm41xsyg9bzq3k3",
    "agent_id": "06h2m4z1waz3bgjbhkm41xsyg9bzq3k4",
    "agent_instance_id": "inst-1",
    "parent_span_id": None,
    "schema_name": "agent:llm",
    "schema_title": "LLM call",
    "status": "active",
    "payload": {"model": "demo-model", "prompt": "What is 6 x 7?"},
    "result_payload": None,
    "summary": None,
    "started_at": "2026-11-30T01:31:15.875134Z",
    "finished_at": None,
    "inserted_at": "2026-11-30T01:31:15.875134Z",
    "updated_at": "2026-11-30T01:31:15.875134Z",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_nginx(work: str) -> tuple[subprocess.Popen[bytes], str, str]:
    cert = os.path.join(work, "cert.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-addext", "basicConstraints=critical,CA:TRUE",
         "-keyout", os.path.join(work, "key.pem"), "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    span = json.dumps({"status": "success", "details": SPAN})
    os.mkdir(os.path.join(work, "static"))
    for size in (100, 500):  # too long for an nginx `return`: served as files
        outputs = {f"bulk-key-{i:06d}": {"status": "success", "details": SPAN} for i in range(size)}
        with open(os.path.join(work, "static", f"bulk{size}.json"), "w") as f:
            json.dump({"status": "success", "outputs": outputs}, f)
    http_port, https_port = free_port(), free_port()
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path {work}/body;
  server {{
    listen 127.0.0.1:{http_port};
    listen 127.0.0.1:{https_port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {work}/key.pem;
    default_type application/json;
    client_body_buffer_size 1m;
    location = /api/v1/agent_spans {{ return 200 '{span}'; }}
    # POST to a static file is a 405; error_page turns it into a GET of the file.
    location = /b100/api/v1/bulk {{ error_page 405 =200 /static/bulk100.json; return 405; }}
    location = /b500/api/v1/bulk {{ error_page 405 =200 /static/bulk500.json; return 405; }}
    location /static/ {{ internal; root {work}; }}
    location / {{ return 200 '{{"status":"success"}}'; }}
  }}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", work, "-c", conf, "-g", "daemon off;"], stderr=subprocess.PIPE)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", http_port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise SystemExit("nginx did not start: " + (proc.stderr.read() if proc.stderr else b"").decode())
    return proc, f"http://127.0.0.1:{http_port}", f"https://127.0.0.1:{https_port}"


def run(env: dict[str, str], *args: object, timeout: float = 300) -> tuple[str, float]:
    """Run one worker; return its stdout and its wall time in seconds."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, WORKER, *map(str, args)], env=env, cwd=env["BENCH_CWD"],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{out.stderr}")
    return out.stdout.strip(), elapsed


def rounds(count: int, targets: list[str], measure) -> dict[str, list]:  # type: ignore[no-untyped-def]
    """Call measure(target) for every target, round-robin, ``count`` rounds."""
    results: dict[str, list] = {t: [] for t in targets}
    for _ in range(count):
        for target in targets:
            results[target].append(measure(target))
    return results


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description="Compare prefactor_http with other clients.")
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run, not for the README")
    parser.add_argument("--baseline", metavar="REV", help="also measure prefactor_http.py as of this git revision")
    args = parser.parse_args()
    if args.baseline:  # before/after in one run: the same noise falls on both
        LABELS["ours-base"] = f"prefactor_http at {args.baseline}"
        TARGETS.insert(1, "ours-base")
        COLD_TARGETS.insert(1, "ours-base")
    for tool in ("nginx", "openssl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not on PATH; see the README's benchmark instructions")
    for module in ("requests", "httpx", "aiohttp", "pydantic"):
        try:
            __import__(module)
        except ImportError:
            raise SystemExit(f"{module} is missing: pip install -r benchmarks/requirements.txt") from None
    cold_rounds, seq_rounds, seq_calls, thread_rounds, thread_calls = (
        (3, 1, 200, 1, 400) if args.quick else (20, 5, 400, 3, 2000)
    )
    work = tempfile.mkdtemp(prefix="prefactor-bench-")
    nginx, http_url, https_url = start_nginx(work)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("PREFACTOR_")}
    cert = os.path.join(work, "cert.pem")
    env.update(SSL_CERT_FILE=cert, REQUESTS_CA_BUNDLE=cert, BENCH_CWD=work, PYTHONDONTWRITEBYTECODE="1")
    # Our file as users run it: compiled once (as pip does for packages), and as a
    # bare copy that is compiled at every start (a read-only Lambda bundle without .pyc).
    for name, compiled in (("BENCH_OURS", True), ("BENCH_OURS_SRC", False), ("BENCH_OURS_BASE", True)):
        folder = os.path.join(work, name.lower())
        os.mkdir(folder)
        if name == "BENCH_OURS_BASE":
            if not args.baseline:
                continue
            source = subprocess.run(["git", "-C", HERE, "show", f"{args.baseline}:prefactor_http.py"],
                                    check=True, capture_output=True).stdout  # fmt: skip
            with open(os.path.join(folder, "prefactor_http.py"), "wb") as f:
                f.write(source)
        else:
            shutil.copy(os.path.join(os.path.dirname(HERE), "prefactor_http.py"), folder)
        if compiled:
            import py_compile

            py_compile.compile(os.path.join(folder, "prefactor_http.py"), doraise=True)
        env[name] = folder
    try:
        return report(env, http_url, https_url, cold_rounds, seq_rounds, seq_calls, thread_rounds, thread_calls)
    finally:
        nginx.terminate()
        nginx.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def report(env, http_url, https_url, cold_rounds, seq_rounds, seq_calls, thread_rounds, thread_calls) -> int:  # type: ignore[no-untyped-def]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; nginx (1 worker) on loopback answers canned JSON")
    print("medians from one run; targets interleaved round by round\n")

    # The server's ceiling: three floor processes of 8 threads at once.
    procs = [subprocess.Popen([sys.executable, WORKER, "threads", "floor", http_url, str(thread_calls)],
                              env=env, cwd=env["BENCH_CWD"], stdout=subprocess.PIPE, text=True) for _ in range(3)]  # fmt: skip
    ceiling = sum(float(p.communicate()[0]) for p in procs)
    print(
        f"server ceiling: {ceiling:,.0f} req/s with 3 concurrent floor processes (client and nginx share the cores)\n"
    )

    imports = rounds(cold_rounds, COLD_TARGETS, lambda t: run(env, "import", t, http_url)[1] * 1000)
    cold_http = rounds(cold_rounds, COLD_TARGETS, lambda t: run(env, "cold", t, http_url)[1] * 1000)
    cold_https = rounds(cold_rounds, COLD_TARGETS, lambda t: run(env, "cold", t, https_url)[1] * 1000)
    memory = rounds(3, COLD_TARGETS, lambda t: int(run(env, "mem", t, http_url)[0]) / 1024)
    med = {name: {t: statistics.median(v) for t, v in data.items()}
           for name, data in (("import", imports), ("cold_http", cold_http), ("cold_https", cold_https), ("mem", memory))}  # fmt: skip
    print(f"### Cold start and memory (median of {cold_rounds} fresh processes; memory: 3)\n")
    print(
        "| client | import ms | import+build+first call, HTTP ms | same, HTTPS ms | peak RSS MiB | cold HTTPS ÷ async pkg | memory ÷ async pkg |"
    )
    print("|---|---|---|---|---|---|---|")
    for t in COLD_TARGETS:
        print(f"| {LABELS[t]} | {med['import'][t]:.1f} | {med['cold_http'][t]:.1f} | {med['cold_https'][t]:.1f} | "
              f"{med['mem'][t]:.1f} | {med['cold_https'][t] / med['cold_https']['upstream']:.2f} | "
              f"{med['mem'][t] / med['mem']['upstream']:.2f} |")  # fmt: skip

    latency: dict[str, dict[str, list[float]]] = {}
    for scheme, url in (("HTTP", http_url), ("HTTPS", https_url)):

        def seq(target: str, url: str = url) -> list[float]:
            return [float(x) for x in run(env, "seq", target, url, seq_calls)[0].split()]

        samples = rounds(seq_rounds, TARGETS, seq)
        latency[scheme] = {t: [x for chunk in v for x in chunk] for t, v in samples.items()}
    print(f"\n### Sequential span create ({seq_rounds * seq_calls} calls each after warm-up)\n")
    print("| client | HTTP p50 µs | HTTP p99 µs | HTTP p50 ÷ floor | HTTPS p50 µs | HTTPS p99 µs | HTTPS p50 ÷ floor |")
    print("|---|---|---|---|---|---|---|")
    p50 = {s: {t: statistics.median(v) for t, v in latency[s].items()} for s in latency}
    for t in TARGETS:
        h, s = latency["HTTP"][t], latency["HTTPS"][t]
        print(f"| {LABELS[t]} | {p50['HTTP'][t]:.0f} | {pct(h, 0.99):.0f} | {p50['HTTP'][t] / p50['HTTP']['floor']:.2f} | "
              f"{p50['HTTPS'][t]:.0f} | {pct(s, 0.99):.0f} | {p50['HTTPS'][t] / p50['HTTPS']['floor']:.2f} |")  # fmt: skip

    threads = rounds(thread_rounds, TARGETS, lambda t: float(run(env, "threads", t, http_url, thread_calls)[0]))
    tput = {t: statistics.median(v) for t, v in threads.items()}
    print(f"\n### 8 threads sharing one client, HTTP (median of {thread_rounds} runs of {thread_calls} calls)\n")
    print("| client | calls/s | ÷ floor |")
    print("|---|---|---|")
    for t in TARGETS:
        print(f"| {LABELS[t]} | {tput[t]:,.0f} | {tput[t] / tput['floor']:.2f} |")

    bulk = rounds(3, ["ours"], lambda t: [float(x) for x in run(env, "bulk", t, http_url, 2000)[0].split()])["ours"]
    single, c100, c500 = (statistics.median(b[i] for b in bulk) for i in range(3))
    print("\n### Client CPU per span, prefactor_http (2000 spans, median of 3)\n")
    print("| how | CPU µs per span | ÷ one call per span |")
    print("|---|---|---|")
    for how, value in (("one call per span", single), ("bulk, chunks of 100", c100), ("bulk, chunks of 500", c500)):
        print(f"| {how} | {value:.1f} | {value / single:.2f} |")

    goals = [
        ("per-call p50 HTTP ≤ 1.15x floor", p50["HTTP"]["ours"] / p50["HTTP"]["floor"], 1.15, "<="),
        ("per-call p50 HTTPS ≤ 1.15x floor", p50["HTTPS"]["ours"] / p50["HTTPS"]["floor"], 1.15, "<="),
        ("8-thread throughput ≥ 0.9x floor", tput["ours"] / tput["floor"], 0.9, ">="),
        ("cold start HTTPS ≤ 0.25x async pkg", med["cold_https"]["ours"] / med["cold_https"]["upstream"], 0.25, "<="),
        ("peak memory ≤ 0.5x async pkg", med["mem"]["ours"] / med["mem"]["upstream"], 0.5, "<="),
    ]
    print("\n### Goals\n")
    for name, value, limit, sense in goals:
        met = value <= limit if sense == "<=" else value >= limit
        print(f"- {name}: {value:.2f} — {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
