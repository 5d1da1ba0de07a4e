"""The transport floor: a bare grpc.aio server that answers every call with the bytes it was sent.

No proto, no interceptors, no model: a generic handler without serializers hands the request bytes to the
method and sends its return value back as they are. The gateway can never be faster than this on the same
machine, with the same client and the same payload; ``grpc-echo`` rows measure it.

Run it as ``python -m cnnserve.bench.echo --listen 127.0.0.1:0``: it prints the bound port on one line, then
serves until SIGTERM. :class:`EchoServer` does exactly that from the harness.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from typing import Any

__all__ = ["EchoServer", "serve"]

_SERVICE, _METHOD = "cnnserve.bench.Echo", "Echo"  # ECHO_METHOD in loadgen: /cnnserve.bench.Echo/Echo


async def serve(listen: str) -> None:
    import grpc

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 * 2**20),
            ("grpc.max_send_message_length", 64 * 2**20),
        ]
    )
    handler = grpc.method_handlers_generic_handler(
        _SERVICE, {_METHOD: grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    await server.start()
    print(port, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(0)


class EchoServer:
    """The echo server in its own process (and process group), on a free loopback port."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cnnserve.bench.echo", "--listen", f"{host}:0"],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.isdigit():
            self.stop()
            raise RuntimeError(f"the echo server did not start (said {line!r})")
        self.target = f"{host}:{line}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        from cnnserve.processes import stop_process_group

        if self.process.poll() is None:
            stop_process_group(self.process.pid, timeout=10)
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m cnnserve.bench.echo", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    asyncio.run(serve(parser.parse_args().listen))


if __name__ == "__main__":
    main()
