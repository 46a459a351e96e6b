"""The load generator: its own process, an aiohttp client with a fixed number of connections.

Reads one JSON spec from argv, hammers one URL for ``warmup + duration`` seconds (or until
``max_requests``), and prints one JSON result line: counts, rate, latency percentiles, status
histogram and this process's CPU use. Only what completes after the warm-up is counted.

With ``urls`` (several servers of one engine, e.g. two API processes on one database) the
connections are dealt out over them in turn, as a round-robin balancer would; the keys stay
round-robin over all requests, so every buyer reaches every server, unless ``keys_by_url``
gives each server its own share of the keys (a balancer sticky by API key).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from typing import Any

import aiohttp

from api import eventloop


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def hammer(spec: dict[str, Any]) -> dict[str, Any]:
    method: str = spec["method"]
    urls: list[str] = spec.get("urls") or [spec["url"]]
    concurrency: int = spec["concurrency"]
    keys: list[str | None] = spec.get("keys") or [None]
    ok_statuses = set(spec["ok_statuses"])
    body = None if spec.get("body") is None else json.dumps(spec["body"]).encode()
    max_requests: int = spec.get("max_requests", 5_000_000)
    per_request_timeout = aiohttp.ClientTimeout(total=spec.get("request_timeout", 30.0))

    headers_by_key = []
    for key in keys:
        h = {"Content-Type": "application/json"} if body is not None else {}
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        headers_by_key.append(h)
    if spec.get("keys_by_url") and len(urls) > 1:
        shares = [headers_by_key[n :: len(urls)] or headers_by_key for n in range(len(urls))]
    else:
        shares = [headers_by_key] * len(urls)

    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    issued = 0
    start = time.perf_counter()
    measure_from = start + spec["warmup"]
    stop_at = measure_from + spec["duration"]

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=per_request_timeout) as session:

        async def one_connection(n: int) -> None:
            nonlocal issued
            url, share = urls[n % len(urls)], shares[n % len(urls)]
            while issued < max_requests:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                headers = share[issued % len(share)]
                issued += 1
                try:
                    async with session.request(method, url, data=body, headers=headers) as r:
                        await r.read()
                        status = str(r.status)
                except (aiohttp.ClientError, TimeoutError) as e:
                    status = type(e).__name__
                t1 = time.perf_counter()
                if t0 >= measure_from and t1 <= stop_at:
                    latencies.append(t1 - t0)
                    statuses[status] += 1

        cpu0 = time.process_time()
        await asyncio.gather(*(one_connection(n) for n in range(concurrency)))
        cpu1 = time.process_time()
    wall = time.perf_counter() - start
    latencies.sort()
    p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
    measured = len(latencies)
    errors = sum(n for s, n in statuses.items() if s not in ok_statuses)
    return {
        "requests": measured,
        "seconds": spec["duration"],
        "rps": measured / spec["duration"],
        "ok_rps": (measured - errors) / spec["duration"],
        "p50_ms": None if p50 is None else p50 * 1000,
        "p99_ms": None if p99 is None else p99 * 1000,
        # The tail's shape, for telling a few long stalls from a uniformly slow queue.
        "tail_ms": {
            str(q): None if v is None else v * 1000
            for q in (0.9, 0.95, 0.999, 1.0)
            for v in [percentile(latencies, q)]
        },
        "errors": errors,
        "statuses": dict(statuses),
        "error_statuses": {s: n for s, n in statuses.items() if s not in ok_statuses},
        "client_cpu": (cpu1 - cpu0) / wall if wall > 0 else 0.0,
        "hit_max_requests": issued >= max_requests,
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    result = eventloop.run(hammer(spec))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
