"""A bounded load test of a running server: N concurrent clients x M requests, on loopback only.

Every answer is compared with the one the same request got alone (greedy decoding is deterministic, so
queueing must not change it). Reports errors, 429s, latency percentiles and throughput.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class LoadReport:
    requests: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    errors: list[str] = field(default_factory=list)
    rejected: int = 0  # 429: queue full
    mismatches: int = 0  # answers that differ from the request's sequential answer
    wall_s: float = 0.0

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else 0.0

    @property
    def p95(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else 0.0

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0

    def summary(self) -> str:
        return (
            f"{self.requests} requests, {len(self.errors)} errors, {self.rejected} rejected (429), "
            f"{self.mismatches} answers differing from sequential; latency p50 {self.p50:.3f} s, "
            f"p95 {self.p95:.3f} s; {self.throughput:.1f} requests/s over {self.wall_s:.1f} s"
        )


def _check_loopback(url: str) -> None:
    if urlsplit(url).hostname not in LOOPBACK:
        raise ValueError(f"the load test only talks to a server on this machine; got {url}, use http://127.0.0.1:PORT")


def _answer(http: httpx.Client, payload: dict) -> tuple[int, str]:
    response = http.post("/v1/chat/completions", json=payload)
    if response.status_code != 200:
        return response.status_code, response.text
    return 200, response.json()["choices"][0]["message"]["content"]


def sequential_answers(url: str, payloads: list[dict], timeout: float = 60.0) -> list[str]:
    """Each payload's answer, asked alone (one request at a time)."""
    _check_loopback(url)
    with httpx.Client(base_url=url, timeout=timeout) as http:
        answers = [_answer(http, payload) for payload in payloads]
    if failed := [text for status, text in answers if status != 200]:
        raise RuntimeError(f"{len(failed)} sequential requests failed, first: {failed[0]}")
    return [text for _, text in answers]


def run_load(
    url: str, payloads: list[dict], expected: list[str], clients: int = 8, per_client: int = 10, timeout: float = 60.0
) -> LoadReport:
    """``clients`` threads each send ``per_client`` chat requests back to back (client i starts at payload i)."""
    _check_loopback(url)
    report = LoadReport(requests=clients * per_client)
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            for j in range(per_client):
                k = (i + j) % len(payloads)
                t = time.perf_counter()
                try:
                    status, text = _answer(http, payloads[k])
                except httpx.HTTPError as err:
                    status, text = 0, f"{type(err).__name__}: {err}"
                latency = time.perf_counter() - t
                with lock:
                    if status == 200:
                        report.latencies.append(latency)
                        report.mismatches += text != expected[k]
                    else:
                        report.rejected += status == 429
                        report.errors.append(f"{status}: {text[:200]}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.wall_s = time.perf_counter() - t
    return report
