"""Locust users for any tsforge model: REST (FastHttpUser) and gRPC (TorchServe's inference.proto).

A model's locustfile subclasses both and sets `model`. Every answer is checked against the reference
answer of its payload (`loadtest.payloads.check`): a wrong answer is reported as a failure.

Extra command-line options: --payloads FILE (cases with expectations, written by `loadtest.run`;
computed from model_store/MODEL.mar when absent), --grpc-target HOST:PORT, --mislabel-every N (canary).
"""

from __future__ import annotations

import random
import time
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import FastHttpUser, User, constant, events, task

from loadtest.payloads import Case, check, load, mislabel
from tsforge.clients.grpc_stubs import stubs
from tsforge.project import ROOT

grpc_gevent.init_gevent()  # grpc's blocking calls must yield to locust's greenlets


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _options(parser: Any) -> None:
    parser.add_argument("--payloads", default="", help="cases JSON with expected answers")
    parser.add_argument("--grpc-target", default="127.0.0.1:7070", help="TorchServe gRPC inference host:port")
    parser.add_argument("--mislabel-every", type=int, default=0, help="canary: expect a wrong label every N cases")


@cache
def cases_for(model: str, payloads: str, mislabel_every: int) -> tuple[Case, ...]:
    if payloads:
        cases = load(Path(payloads))
    else:
        from loadtest.inprocess import prepared_cases

        cases = prepared_cases(model, ROOT / "model_store" / f"{model}.mar")
    return tuple(mislabel(cases, mislabel_every))


class ModelUser(User):
    abstract = True
    model = ""
    wait_time = constant(0)  # closed loop: the next request leaves when the answer arrives

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.cases = cases_for(self.model, getattr(options, "payloads", ""), getattr(options, "mislabel_every", 0))
        self.cursor = random.randrange(len(self.cases))

    def next_case(self) -> Case:
        self.cursor = (self.cursor + 1) % len(self.cases)
        return self.cases[self.cursor]


class RestUser(FastHttpUser, ModelUser):  # type: ignore[misc]
    abstract = True

    @task
    def predict(self) -> None:
        case = self.next_case()
        name = f"/predictions/{self.model}"
        body: Any = case.body  # FastHttpSession sends bytes as they are; its stubs say str
        with self.client.post(name, data=body, name=name, headers={"Content-Type": case.content_type},
                              catch_response=True) as response:
            reason = check(case, response.status_code or 0, response.content or b"")
            if reason is None:
                response.success()
            else:
                response.failure(reason)


class GrpcUser(ModelUser):
    abstract = True

    def on_start(self) -> None:
        super().on_start()
        self.stubs = stubs()
        self.channel = grpc.insecure_channel(self.environment.parsed_options.grpc_target)
        self.stub = self.stubs.inference_grpc.InferenceAPIsServiceStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def predict(self) -> None:
        from loadtest.loadgen import grpc_status_to_http

        case = self.next_case()
        request = self.stubs.inference.PredictionsRequest(model_name=self.model, input={"data": case.body})
        started = time.perf_counter()
        try:
            body = self.stub.Predictions(request, timeout=60).prediction
            status = 200
        except grpc.RpcError as exc:
            status, body = grpc_status_to_http(exc.code()), (exc.details() or "").encode()
        reason = check(case, status, body)
        events.request.fire(  # type: ignore[no-untyped-call]
            request_type="grpc", name=f"Predictions/{self.model}",
                            response_time=(time.perf_counter() - started) * 1000.0, response_length=len(body),
                            exception=AssertionError(reason) if reason else None, context={})
