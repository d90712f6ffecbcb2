"""`python -m imgret.serve.load`: a bounded load test of a running demo server, on loopback.

Sends `--requests` searches from `--concurrency` threads (each with its own keep-alive connection), stops at
`--max-seconds` whatever is left, and prints requests per second, latency p50/p99 and every non-200 answer.
Each request uploads `--image`, or, without one, names a query from the server's query set (the server then
reads that image itself), so both paths through POST /api/search can be loaded.
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class LoadResult:
    requests: int  # answered (any status)
    errors: int  # answered with a status other than 200, or not answered
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    statuses: dict  # status (or the exception's name) -> count
    concurrency: int

    def describe(self) -> str:
        return (f"{self.requests} requests at concurrency {self.concurrency} in {self.seconds:.2f} s: "
                f"{self.requests_per_s:.1f} requests/s, p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, "
                f"{self.errors} errors {self.statuses}")


def multipart(fields: dict[str, str], file_field: str | None = None, filename: str = "",
              content: bytes = b"") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    if file_field:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + content + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def run_load(url: str, requests: int = 200, concurrency: int = 8, max_seconds: float = 30.0,
             image: Path | None = None, k: int = 10, index: str | None = None) -> LoadResult:
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK:
        raise ValueError(f"--url {url}: the load test only runs against this machine (127.0.0.1, localhost)")
    host, port = parts.hostname, parts.port or 80
    fields = {"k": str(k), **({"index": index} if index else {})}
    if image is None:
        info = json.loads(_get(host, port, "/api/indexes"))
        query_count = int(info["query_set_size"])
        if not query_count:
            raise ValueError("the server has no query set: give --image")
        bodies = [multipart({**fields, "query_id": str(i % query_count)}) for i in range(min(requests, 64))]
    else:
        bodies = [multipart(fields, "image", Path(image).name, Path(image).read_bytes())]

    counter = itertools.count()
    deadline = time.monotonic() + max_seconds
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    lock = threading.Lock()

    def worker() -> None:
        connection = http.client.HTTPConnection(host, port, timeout=max_seconds)
        try:
            while time.monotonic() < deadline:
                n = next(counter)
                if n >= requests:
                    return
                body, content_type = bodies[n % len(bodies)]
                start = time.perf_counter()
                try:
                    connection.request("POST", "/api/search", body, {"Content-Type": content_type})
                    response = connection.getresponse()
                    response.read()
                    status = str(response.status)
                except (OSError, http.client.HTTPException) as error:
                    status = type(error).__name__
                    connection.close()
                    connection = http.client.HTTPConnection(host, port, timeout=max_seconds)
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    latencies.append(elapsed)
                    statuses[status] = statuses.get(status, 0) + 1
        finally:
            connection.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    seconds = time.perf_counter() - start
    answered = len(latencies)
    times = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return LoadResult(requests=answered, errors=answered - statuses.get("200", 0) + max(0, requests - answered),
                      seconds=seconds, requests_per_s=answered / seconds if seconds else float("nan"),
                      p50_ms=float(np.percentile(times, 50)), p99_ms=float(np.percentile(times, 99)),
                      statuses=dict(sorted(statuses.items())), concurrency=concurrency)


def _get(host: str, port: int, path: str) -> bytes:
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        if response.status != 200:
            raise ValueError(f"GET {path} answered {response.status}: is this an imgret server?")
        return response.read()
    finally:
        connection.close()


def main(argv: list[str] | None = None) -> LoadResult:
    parser = argparse.ArgumentParser(prog="python -m imgret.serve.load", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=30.0, help="stop sending after this long")
    parser.add_argument("--image", type=Path, help="upload this file; default: queries from the query set by id")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--index", help="an index name from GET /api/indexes; default: the server's")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if min(args.requests, args.concurrency) < 1 or args.max_seconds <= 0:
        parser.error("--requests and --concurrency must be >= 1, --max-seconds > 0")
    load_before = os.getloadavg()[0]
    result = run_load(args.url, args.requests, args.concurrency, args.max_seconds, args.image, args.k, args.index)
    print(result.describe(), f"(1-minute load average before: {load_before:.2f})")
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2))
    return result


if __name__ == "__main__":
    main()
