"""Run all of Courier in one terminal: migrations, an admin login, then the web server
(gunicorn), the huey worker and the DICOM receiver.

Ctrl-C stops everything within seconds. For several machines, run the same processes
under a supervisor instead (see the README's deployment section).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

# After Ctrl-C, how long each process gets to finish on its own before it is killed
# (a worker in the middle of a send finishes its instance; the job resumes later).
STOP_SECONDS = 10.0


def web_command(addr: str) -> list[str]:
    """gunicorn serving the site: threads, so a slow Test or query holds one thread,
    not a process; the timeout is the worker's heartbeat, not a request's length."""
    if importlib.util.find_spec("gunicorn") is None:
        raise CommandError(
            "gunicorn is not installed: pip install -e '.[scale]' (./courier run does)"
        )
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "config.wsgi",
        "--chdir",
        str(settings.BASE_DIR),
        "--bind",
        addr,
        "--workers",
        "2",
        "--worker-class",
        "gthread",
        "--threads",
        "8",
        "--graceful-timeout",
        "5",
        # No ~/.gunicorn control socket: a second instance (tests) would clash.
        "--no-control-socket",
    ]


class Command(BaseCommand):
    help = (
        "Migrate, ensure an admin login, then run the web server (gunicorn), the huey "
        "worker and the DICOM receiver until Ctrl-C."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--addr", default=os.environ.get("COURIER_ADDR", "127.0.0.1:8000")
        )
        parser.add_argument(
            "--workers",
            type=int,
            default=None,
            help="worker threads (default from settings)",
        )

    def handle(self, *args, addr: str, workers: int | None, **options):
        call_command("migrate", interactive=False, verbosity=0)
        self.ensure_admin()
        manage = [sys.executable, str(settings.BASE_DIR / "manage.py")]
        worker_cmd = manage + ["run_huey"]
        if workers:
            worker_cmd += ["--workers", str(workers)]
        commands = {"web": web_command(addr), "worker": worker_cmd}
        commands.update(self.extra_processes(manage))
        stopping = False

        def stop(*_):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        procs: dict[str, subprocess.Popen] = {}
        try:
            for name, cmd in commands.items():
                procs[name] = subprocess.Popen(cmd)
            self.stdout.write(
                self.style.SUCCESS(
                    f"Courier is running: http://{addr}/admin/  (Ctrl-C stops it)"
                )
            )
            self.stdout.flush()
            while not stopping:
                for name, proc in procs.items():
                    if proc.poll() is not None:
                        self.stderr.write(
                            f"{name} exited with {proc.returncode}; stopping"
                        )
                        stopping = True
                time.sleep(0.5)
        finally:
            self.stop_all(procs)

    def stop_all(self, procs: dict[str, subprocess.Popen]) -> None:
        # Ctrl-C in a terminal already reached every process of the group; a SIGTERM
        # to this command alone did not, so pass it on as SIGINT (graceful).
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_SECONDS
        for name, proc in procs.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
                self.stdout.write(f"{name} stopped")
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.stderr.write(
                    f"{name} did not stop within {STOP_SECONDS:g} s: killed"
                )

    def extra_processes(self, manage: list[str]) -> dict[str, list[str]]:
        """Further processes to run beside web and worker (e.g. the DICOM receiver)."""
        return {"receiver": manage + ["receive"]}

    def ensure_admin(self) -> None:
        User = get_user_model()
        username = os.environ.get("COURIER_ADMIN_USER", "admin")
        password = os.environ.get("COURIER_ADMIN_PASSWORD")
        if User.objects.filter(is_superuser=True).exists() and not password:
            return
        if password:
            # The same rules as every password set in the admin.
            try:
                validate_password(password, User(username=username))
            except ValidationError as exc:
                raise CommandError(
                    "COURIER_ADMIN_PASSWORD is too weak: " + " ".join(exc.messages)
                ) from None
        user, created = User.objects.get_or_create(
            username=username, defaults={"is_staff": True, "is_superuser": True}
        )
        if created or password:
            shown = password is None
            password = password or secrets.token_urlsafe(12)
            user.set_password(password)
            user.is_staff = user.is_superuser = True
            user.save()
            if shown:
                # Printed once, on the operator's terminal, so the first login works.
                self.stdout.write(
                    self.style.WARNING(
                        f"Admin login created: user {username!r}, password {password!r} "
                        "(set COURIER_ADMIN_PASSWORD to choose it)."
                    )
                )
