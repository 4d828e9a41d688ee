"""A lightweight closed-loop load generator (asyncio, or grpc.aio): no locust, nothing beyond the stdlib for REST.

N users each send a request, wait for the answer, check it, and send the next, for a fixed time.
Writes the same summary JSON as `make loadtest` does with locust.

    python -m loadtest.loadgen --model digits --url http://127.0.0.1:8080 --users 16 --duration 30
    python -m loadtest.loadgen --model digits --grpc 127.0.0.1:7070 --users 16 --run-dir build/serve
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.http1 import Http1Client
from loadtest.payloads import Case, check

# Failure reasons kept verbatim in the report; past this many distinct ones the rest are "other".
MAX_REASONS = 20


@dataclass
class LoadResult:
    """Every measured request: when it started (s since the start), its latency (ms) and failure reason."""

    started: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    failed_at: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def record(self, at: float, latency_ms: float, reason: str | None) -> None:
        self.started.append(at)
        self.latency_ms.append(latency_ms)
        if reason is not None:
            self.failed += 1
            self.failed_at.append(at)
            key = reason if reason in self.failures or len(self.failures) < MAX_REASONS else "other"
            self.failures[key] = self.failures.get(key, 0) + 1


class RestClient:
    """One user's keep-alive connection (loadtest/http1.py): the cheapest client this machine can run."""

    def __init__(self, url: str) -> None:
        self.http = Http1Client(url)

    async def send(self, case: Case) -> tuple[int, bytes]:
        return await self.http.send(case.body, case.content_type, case.headers)

    async def close(self) -> None:
        self.http.close()


class GrpcClient:
    """TorchServe's inference.proto `Predictions` call; the body travels in the `data` input."""

    def __init__(self, target: str, model: str, timeout_s: float = 60.0) -> None:
        import grpc

        from tsforge.clients.grpc_stubs import stubs

        self.stubs = stubs()
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = self.stubs.inference_grpc.InferenceAPIsServiceStub(self.channel)
        self.model = model
        self.timeout_s = timeout_s

    async def send(self, case: Case) -> tuple[int, bytes]:
        import grpc

        request = self.stubs.inference.PredictionsRequest(model_name=self.model, input={"data": case.body})
        try:
            response = await self.stub.Predictions(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            return grpc_status_to_http(exc.code()), (exc.details() or "").encode()
        return 200, response.prediction

    async def close(self) -> None:
        await self.channel.close()


def grpc_status_to_http(code: Any) -> int:
    names = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503,
             "DEADLINE_EXCEEDED": 504, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}
    return names.get(getattr(code, "name", ""), 500)


async def _user(client: RestClient | GrpcClient, cases: list[Case], offset: int, warmup_end: float,
                result: LoadResult) -> None:
    """Send, check, repeat; every answer that arrives after the warm-up is recorded (the caller stops us)."""
    for case in itertools.islice(itertools.cycle(cases), offset, None):
        sent = time.perf_counter()
        try:
            status, body = await client.send(case)
            reason = check(case, status, body)
        except Exception as exc:  # a refused connection or a timeout is a failed request, not a crash
            reason = type(exc).__name__
        done = time.perf_counter()
        if done >= warmup_end:
            result.record(done - warmup_end, (done - sent) * 1000.0, reason)


async def run_load(cases: list[Case], users: int, duration_s: float, *, url: str | None = None,
                   grpc_target: str | None = None, model: str = "", warmup_s: float = 1.0) -> LoadResult:
    """Closed loop: `users` concurrent senders for warmup_s + duration_s.

    Answers that arrive within the measured window count, whenever they were sent, so a server slower
    than the window still shows its throughput; requests still in flight at the end are cancelled.
    """
    clients: list[RestClient | GrpcClient]
    if grpc_target:
        clients = [GrpcClient(grpc_target, model)] * users  # one HTTP/2 channel carries every user's calls
    elif url:
        clients = [RestClient(url) for _ in range(users)]
    else:
        raise ValueError("give url or grpc_target")
    result = LoadResult()
    warmup_end = time.perf_counter() + warmup_s
    # Spread users over the payloads so a batch holds different bodies.
    step = max(1, len(cases) // max(1, users))
    tasks = [asyncio.create_task(_user(clients[n], cases, n * step, warmup_end, result)) for n in range(users)]
    try:
        await asyncio.wait(tasks, timeout=warmup_s + duration_s)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in dict.fromkeys(clients):
            await client.close()
    result.elapsed_s = duration_s
    return result


def load(cases: list[Case], users: int, duration_s: float, **kwargs: Any) -> LoadResult:
    return asyncio.run(run_load(cases, users, duration_s, **kwargs))


def main(argv: list[str] | None = None) -> int:
    from loadtest import report
    from tsforge.project import ROOT

    parser = argparse.ArgumentParser(prog="python -m loadtest.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="TorchServe inference address")
    parser.add_argument("--grpc", help="host:port of TorchServe's gRPC inference API (instead of REST)")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds (after 1 s of warm-up)")
    parser.add_argument("--payloads", type=Path, help="saved cases (JSON) instead of computing references")
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--run-dir", type=Path, help="the server's run folder, to monitor its process tree")
    parser.add_argument("--mislabel-every", type=int, default=0, help="canary: expect a wrong label every N cases")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "loadgen")
    args = parser.parse_args(argv)

    from loadtest.payloads import load as load_cases
    from loadtest.payloads import mislabel

    if args.payloads:
        cases = load_cases(args.payloads)
    else:
        from loadtest.inprocess import prepared_cases

        cases = prepared_cases(args.model, args.store / f"{args.model}.mar")
    cases = mislabel(cases, args.mislabel_every)
    url = f"{args.url.rstrip('/')}/predictions/{args.model}"
    pid = report.server_pid(args.run_dir) if args.run_dir else None
    from loadtest.monitor import monitored

    with monitored(pid) as server:
        result = load(cases, args.users, args.duration, url=None if args.grpc else url, grpc_target=args.grpc,
                      model=args.model)
    summary = report.summarize(result, tool="loadgen", model=args.model, protocol="grpc" if args.grpc else "rest",
                               users=args.users, target=args.grpc or url, server=server)
    paths = report.write(summary, args.out, timeline=report.timeline(result))
    print(json.dumps({k: summary[k] for k in ("qps", "latency_ms", "success_rate")}))
    print(f"reports: {', '.join(str(p) for p in paths)}")
    return 0 if summary["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
