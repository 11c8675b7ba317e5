"""Run Courier's DICOM receiver (C-STORE and C-ECHO SCP) in the foreground."""

from __future__ import annotations

import signal

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from config.preload import preload_for_threads
from dispatch.receiving.bookkeeping import DatabaseBookkeeper
from dispatch.receiving.commitment import parse_peers
from dispatch.receiving.receiver import Receiver, SpoolInUse
from targets.dicomnet.scp import Limits


class Command(BaseCommand):
    help = (
        "Receive DICOM (C-STORE, C-ECHO) into the spool and hand complete series to "
        "routing. Settings: COURIER_AE_TITLE, COURIER_RECEIVER_PORT, "
        "COURIER_RECEIVER_ACCEPTED_CALLING_AETS, COURIER_SERIES_QUIET_SECONDS, "
        "COURIER_RECEIVER_COMMITMENT_PEERS, "
        "COURIER_MIN_FREE_BYTES and the COURIER_RECEIVER_* limits (README)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=None)
        parser.add_argument(
            "--host", default="0.0.0.0", help="address to listen on (default: all)"
        )
        parser.add_argument("--ae-title", default=None)

    def handle(
        self, *args, port: int | None, host: str, ae_title: str | None, **options
    ):
        ae_title = ae_title or settings.COURIER_AE_TITLE
        port = settings.COURIER_RECEIVER_PORT if port is None else port
        try:
            peers = parse_peers(settings.COURIER_RECEIVER_COMMITMENT_PEERS)
        except ValueError as exc:
            raise CommandError(f"COURIER_RECEIVER_COMMITMENT_PEERS: {exc}") from exc
        bookkeeper = DatabaseBookkeeper(f"{ae_title}@{port}")
        receiver = Receiver(
            ae_title=ae_title,
            port=port,
            host=host,
            spool_dir=settings.COURIER_SPOOL_DIR,
            accepted_calling_aets=settings.COURIER_RECEIVER_ACCEPTED_CALLING_AETS,
            min_free_bytes=settings.COURIER_MIN_FREE_BYTES,
            quiet_seconds=settings.COURIER_SERIES_QUIET_SECONDS,
            bookkeeper=bookkeeper,
            max_instance_bytes=settings.COURIER_RECEIVER_MAX_INSTANCE_BYTES,
            limits=receiver_limits(),
            commitment_peers=peers,
        )

        def stop(*_):
            receiver.request_stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        # Association and bookkeeping threads import pydicom and the routing code.
        preload_for_threads()
        try:
            receiver.start()
        except SpoolInUse as exc:
            raise CommandError(str(exc)) from exc
        except OSError as exc:
            raise CommandError(f"cannot listen on {host}:{port}: {exc}") from exc
        self.stdout.write(
            self.style.SUCCESS(
                f"Receiving as {ae_title} on {host}:{receiver.port} (Ctrl-C stops)"
            )
        )
        self.stdout.flush()
        receiver.wait_stopped()
        bookkeeper.stopped(receiver.info())


def receiver_limits() -> Limits:
    """The receiver's limits from the settings (at most 4 waiting connections per
    association slot, so waiting connections are bounded too)."""
    max_associations = max(1, settings.COURIER_RECEIVER_MAX_ASSOCIATIONS)
    per_peer = settings.COURIER_RECEIVER_MAX_ASSOCIATIONS_PER_PEER
    return Limits(
        max_associations=max_associations,
        max_per_peer=per_peer if per_peer > 0 else 1 << 30,
        max_pending=4 * max_associations,
        associate_timeout=settings.COURIER_RECEIVER_ASSOCIATE_TIMEOUT,
        pdu_timeout=settings.COURIER_RECEIVER_PDU_TIMEOUT,
        idle_timeout=settings.COURIER_RECEIVER_IDLE_TIMEOUT,
        backlog=settings.COURIER_RECEIVER_LISTEN_BACKLOG,
    )
