"""Soak: many calls through one client against LocalApiServer with injected faults.

    python benchmarks/soak.py [--calls 10000] [--fault-rate 0.1] [--seed 1] [--max-seconds 120]

Before a call, with probability --fault-rate, one fault is armed on the stand-in:
the connection dropped before processing, dropped after processing (the answer is
lost), 503 with Retry-After, 503 without, or the kept-alive connection closed right
after the answer. Every call creates a span with a generated idempotency key. At the
end the records on the server must equal the successful calls, with no duplicates;
the exit status is 1 otherwise. Bounded by --calls and --max-seconds.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prefactor_http as ph

FAULTS = ("drop_before", "drop_after", "503_retry_after", "503", "idle_close")


def arm(api: ph.LocalApiServer, fault: str) -> None:
    if fault == "drop_before":
        api.drop_next(when="before")
    elif fault == "drop_after":
        api.drop_next(when="after")
    elif fault == "503_retry_after":
        api.fail_next(503, retry_after=0)
    elif fault == "503":
        api.fail_next(503)
    else:
        api.drop_next(when="idle")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--fault-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    faults: Counter[str] = Counter()
    returned: list[str] = []
    failures: Counter[str] = Counter()
    with ph.LocalApiServer() as api:
        config = api.config(max_retries=5, initial_retry_delay=0.001, max_retry_delay=0.01, request_timeout=5)
        with ph.PrefactorHttpClient(config) as client:
            inst = client.agent_instances.register({"name": "soak"}, agent_id="soak-agent")
            client.agent_instances.start(inst.id)
            baseline = len(api.requests)
            started = time.monotonic()
            calls = 0
            while calls < args.calls and time.monotonic() - started < args.max_seconds:
                if rng.random() < args.fault_rate:
                    fault = rng.choice(FAULTS)
                    faults[fault] += 1
                    arm(api, fault)
                calls += 1
                try:
                    returned.append(client.agent_spans.create(inst.id, "soak:call", "active", {"n": calls}).id)
                except ph.PrefactorHttpError as exc:
                    failures[type(exc).__name__] += 1
            elapsed = time.monotonic() - started
            attempts = len(api.requests) - baseline
            records = [s for s in api.spans.values() if s["agent_instance_id"] == inst.id]
    per_call = Counter(s["payload"]["n"] for s in records)
    duplicates = sum(n - 1 for n in per_call.values() if n > 1)
    unknown = set(returned) - {s["id"] for s in records}
    print(f"calls              {calls} in {elapsed:.1f} s ({calls / elapsed:.0f}/s)")
    print(f"successful calls   {len(returned)}")
    print(f"failed calls       {sum(failures.values())} {dict(failures) if failures else ''}")
    print(f"faults injected    {sum(faults.values())} {dict(sorted(faults.items()))}")
    print(f"attempts on server {attempts} (retries: {attempts - calls})")
    print(f"records on server  {len(records)}")
    print(f"duplicates         {duplicates}")
    print(f"returned ids not on the server: {len(unknown)}")
    good = len(records) == len(returned) and duplicates == 0 and not unknown
    print("OK: every successful call is exactly one record" if good else "FAILED")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
