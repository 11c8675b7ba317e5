"""Sending over a slow link: a TCP proxy adding latency, Courier with 1/4/8 associations.

INNER FIGURES (the second line): Courier is timed inside its process around
handler.send() (interpreter start, Django and the job bookkeeping excluded); the
whole-process figures users see come from bench/cmd_send.py (bench/README.md).

    .venv/bin/python bench/latency_proxy.py [--delay-ms 20] [--count 300] [--runs 2]
    .venv/bin/python bench/latency_proxy.py --serve LISTEN_PORT HOST:PORT [--delay-ms 20]

The kernel here has no netem, so latency comes from a small asyncio proxy that holds
every chunk it reads for `--delay-ms` before writing it on, in each direction (a round
trip costs twice the delay). One association then waits one round trip per C-STORE:
the case of a remote PACS or a cloud archive. The proxy runs as its own process so it
does not share Courier's interpreter. The run sends one series of ~39 KB instances to
dcmtk storescp (`--fork`) through the proxy with storescu (one association) and with
Courier (1, 4, 8 associations), and prints medians and ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from send_dicom import dicom_target, rates, time_courier, time_storescu

from targets.series import scan_folder
from tests.dicomgen import make_series
from tests.peers import StoreSCP, free_port, port_open


async def _pipe(reader, writer, delay: float) -> None:
    """Copy reader to writer, each chunk released `delay` s after it was read."""
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def read() -> None:
        while data := await reader.read(256 * 1024):
            await queue.put((loop.time() + delay, data))
        await queue.put((loop.time() + delay, b""))

    async def write() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                break
            writer.write(data)
            await writer.drain()
        writer.close()

    await asyncio.gather(read(), write(), return_exceptions=True)


async def serve(listen_port: int, host: str, port: int, delay: float) -> None:
    async def handle(client_reader, client_writer) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(host, port)
        except OSError:
            client_writer.close()
            return
        for w in (client_writer, server_writer):
            sock = w.get_extra_info("socket")
            sock.setsockopt(6, 1, 1)  # TCP_NODELAY: the delay is ours, not Nagle's
        await asyncio.gather(
            _pipe(client_reader, server_writer, delay),
            _pipe(server_reader, client_writer, delay),
        )

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


def run_bench(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="courier-bench-"))
    folder = make_series(work / "series", args.count).folder
    series = scan_folder(folder)
    with StoreSCP(work / "storescp", max_pdu=131072, fork=True) as scp:
        listen = free_port()
        proxy = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                str(listen),
                f"127.0.0.1:{scp.port}",
                "--delay-ms",
                str(args.delay_ms),
            ]
        )
        try:
            deadline = time.monotonic() + 10
            while not port_open(listen):
                if time.monotonic() > deadline:
                    raise SystemExit("the latency proxy did not start")
                time.sleep(0.05)
            print(
                f"{len(series)} instances, {series.total_bytes / 1e6:.1f} MB, "
                f"{args.delay_ms} ms added each way"
            )
            base = []
            for _ in range(args.runs):
                scp.clear()
                base.append(time_storescu(listen, scp.aet, folder))
            s = statistics.median(base)
            print(f"  storescu, 1 association   {rates(s, series)}")
            for n in (1, 4, 8):
                times = []
                for _ in range(args.runs):
                    scp.clear()
                    times.append(time_courier(dicom_target(listen, scp.aet, n), series))
                c = statistics.median(times)
                label = f"{n} association{'s' if n > 1 else ' '}"
                print(
                    f"  Courier, {label:14} {rates(c, series)}   {s / c:.2f}x storescu"
                )
        finally:
            proxy.terminate()
            proxy.wait(5)
            scp.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", nargs=2, metavar=("LISTEN_PORT", "HOST:PORT"))
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    if args.serve:
        host, _, port = args.serve[1].rpartition(":")
        asyncio.run(serve(int(args.serve[0]), host, int(port), args.delay_ms / 1000))
    else:
        run_bench(args)


if __name__ == "__main__":
    main()
