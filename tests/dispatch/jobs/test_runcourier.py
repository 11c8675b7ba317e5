"""`manage.py runcourier` (what `./courier run` starts) as an operator runs it: gunicorn
serves the site, the worker and the receiver run beside it, and Ctrl-C in the terminal
stops them all on their own, without anything being killed."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

from tests.fixtures.dispatch_peers import PROJECT
from tests.fixtures.receive_peers import echoscu
from tests.peers import free_port, port_open


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_runcourier_serves_with_gunicorn_and_stops_on_ctrl_c(courier_site):
    site = courier_site().migrate()
    web, dicom = free_port(), free_port()
    log = site.workdir / "runcourier.log"
    env = {
        **site.env,
        "COURIER_RECEIVER_PORT": str(dicom),
        "COURIER_ADMIN_PASSWORD": "Runcourier-test-9f3a2c",
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(PROJECT / "manage.py"), "runcourier",
             "--addr", f"127.0.0.1:{web}"],
            env=env, cwd=PROJECT, stdout=out, stderr=subprocess.STDOUT,
            # Its own process group, as a terminal's foreground job has.
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (port_open(web) and port_open(dicom)):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)

        status, headers, body = get(f"http://127.0.0.1:{web}/admin/login/")
        assert status == 200 and headers["Server"].startswith("gunicorn")
        assert b"Courier" in body
        assert get(f"http://127.0.0.1:{web}/static/admin/css/base.css")[0] == 200
        assert echoscu(dicom).returncode == 0
        deadline = time.monotonic() + 60
        while True:  # the receiver's first heartbeat reaches the database
            status, _, body = get(f"http://127.0.0.1:{web}/health/")
            report = json.loads(body)
            if report.get("receivers") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == 200 and report["status"] == "ok", report
        assert report["receivers"][0]["state"] == "listening"

        # Ctrl-C: the terminal sends SIGINT to the whole foreground group.
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    output = log.read_text()
    for name in ("web", "worker", "receiver"):
        assert f"{name} stopped" in output, output
    assert "killed" not in output and "Traceback" not in output, output
    assert "development server" not in output.lower()
    assert not port_open(web) and not port_open(dicom)
    # The receiver said it stopped on purpose: monitoring is not told it went silent.
    with sqlite3.connect(site.data / "courier.sqlite3") as db:
        (info,) = db.execute("SELECT info FROM dispatch_receiverstatus").fetchone()
    assert json.loads(info)["stopped"] is True
