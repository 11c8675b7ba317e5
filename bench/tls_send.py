"""The cost of TLS: Courier's DICOM+TLS sender beside its plain DICOM sender.

INNER FIGURES (the second line): Courier is timed inside its process around
handler.send() (interpreter start, Django and the job bookkeeping excluded); the
whole-process figures users see come from bench/cmd_send.py (bench/README.md).

    .venv/bin/python bench/tls_send.py [--runs 3] [--count 500]

Generates certificates (tests/fixtures/web_peers.py `make_pki`) and 500 x ~39 KB and
500 x ~530 KB instances, starts two dcmtk storescp on loopback (TCP_NODELAY=1), one
plain and one with mutual TLS (`+tls server.key server.pem +cf ca.pem`), and sends
each series to both with Courier (one association, timed around `handler.send()`)
and, for reference, with dcmtk's storescu (`+tls` for the TLS one; timed as a whole
command). The receivers are emptied between runs. Prints medians and the TLS / plain
ratio of each sender.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from send_dicom import dicom_target, rates, time_courier, time_storescu

from targets.models import DicomTlsTarget
from targets.series import scan_folder
from tests.dicomgen import make_series
from tests.fixtures.web_peers import TlsStoreSCP, make_pki
from tests.peers import StoreSCP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=500)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="courier-bench-"))
    print(f"generating certificates and 2 x {args.count} instances in {work} ...")
    pki = make_pki(work / "pki")
    folders = {
        "small (~39 KB)": make_series(work / "small", args.count).folder,
        "large (~530 KB)": make_series(work / "large", args.count, size=512).folder,
    }
    tls_args = ["+tls", pki["client.key"], pki["client.pem"], "+cf", pki["ca.pem"]]
    with (
        StoreSCP(work / "plain", aet="TLSSCP") as plain,
        TlsStoreSCP(work / "tls", pki) as tls,
    ):
        plain_target = dicom_target(plain.port, plain.aet)
        tls_target = DicomTlsTarget(
            name="bench-tls",
            host="127.0.0.1",
            port=tls.port,
            called_aet=tls.aet,
            calling_aet="COURIER",
            tls_ca_cert=pki["ca.pem"],
            tls_client_cert=pki["client.pem"],
            tls_client_key=pki["client.key"],
            dimse_timeout=30.0,
        )
        for label, folder in folders.items():
            series = scan_folder(folder)
            print(
                f"\n{label}: {len(series)} instances, {series.total_bytes / 1e6:.1f} MB"
            )
            times: dict[str, list[float]] = {
                "Courier plain": [],
                "Courier TLS": [],
                "storescu plain": [],
                "storescu TLS": [],
            }
            for _ in range(args.runs):
                for scp in (plain, tls):
                    scp.clear()
                times["Courier plain"].append(time_courier(plain_target, series))
                times["Courier TLS"].append(time_courier(tls_target, series))
                for scp in (plain, tls):
                    scp.clear()
                times["storescu plain"].append(
                    time_storescu(plain.port, plain.aet, folder)
                )
                times["storescu TLS"].append(
                    time_storescu(tls.port, tls.aet, folder, tls_args)
                )
            med = {k: statistics.median(v) for k, v in times.items()}
            for name, values in times.items():
                print(
                    f"  {name:15} {rates(med[name], series)}   runs "
                    + " ".join(f"{x:.2f}" for x in values)
                )
            for who in ("Courier", "storescu"):
                ratio = med[f"{who} TLS"] / med[f"{who} plain"]
                print(f"  {who}: TLS takes {ratio:.2f}x the time of plain DICOM")
        plain.clear()
        tls.clear()


if __name__ == "__main__":
    main()
