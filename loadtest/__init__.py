"""Load tests, side-by-side benchmarks and a configuration tuner for tsforge archives.

    make loadtest MODEL=digits USERS=16 DURATION=30 PROTOCOL=rest|grpc   # run.py: locust, headless
    make bench MODEL=resnet18 LEVELS=1,4,16 DURATION=20                   # bench.py
    make tune MODEL=digits P99_MS=50 BUDGET=300                           # tune.py
    make benchmarks-doc                                                   # render.py -> docs/benchmarks.md

payloads.py    varied real request bodies per model, and the answer check
inprocess.py   an archive's handler in this process: reference answers, the in-process ceiling
loadgen.py     closed-loop generator (asyncio + http1.py, or grpc.aio) for machines without locust
http1.py       the minimal HTTP/1.1 keep-alive client it uses: stdlib only, cheap per request
locustfiles/   locust users per model, REST (FastHttpUser) and gRPC (TorchServe's inference.proto)
monitor.py     server CPU and peak RSS (psutil on the process tree), TorchServe's own metrics
report.py      the summary JSON and its plot;  render.py  bench/tune reports as markdown and plots
flask_baseline.py, serving.py   the servers a benchmark compares
"""
