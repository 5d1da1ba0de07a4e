"""``cnnserve bench``: cnnserve side by side with what a user could run instead, in one invocation.

Modules, each one job:

- :mod:`~cnnserve.bench.results`: the result row, percentiles and repetition statistics;
- :mod:`~cnnserve.bench.loadgen`: the closed-loop load generator (its own process: ``python -m``);
- :mod:`~cnnserve.bench.echo`: the bare grpc.aio echo server, the transport floor (its own process);
- :mod:`~cnnserve.bench.oip`: the OIP gRPC ModelInfer client (the gateway's OIP service and the KServe peer);
- :mod:`~cnnserve.bench.kserve_peer`: a KServe ModelServer on the same ONNX files, in a venv of its own;
- :mod:`~cnnserve.bench.servers`: model artifacts, TorchServe and the gateway, CPU meters;
- :mod:`~cnnserve.bench.scenarios`: one function per scenario, each returning result rows;
- :mod:`~cnnserve.bench.report`: target ratios, ``results.json``, ``README.md`` and the plots;
- :mod:`~cnnserve.bench.harness`: the order things run in.

Only :mod:`~cnnserve.bench.results` and :mod:`~cnnserve.bench.loadgen` are light to import (no torch), so the
load generator's process stays small.
"""
