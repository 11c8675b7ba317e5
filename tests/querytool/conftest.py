"""Query tool test helpers: huey in immediate mode, spool/download/data dirs in tmp."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from huey.contrib.djhuey import HUEY


@pytest.fixture
def staff(client, django_user_model, settings):
    """A logged-in staff user who may search, retrieve and export, nothing more."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    user = django_user_model.objects.create_user("nurse", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(
            content_type__app_label="querytool",
            codename__in=[
                "search_sources",
                "retrieve_studies",
                "export_to_any_target",
            ],
        )
    )
    client.force_login(user)
    return user


@pytest.fixture
def immediate_huey():
    before = HUEY.immediate
    HUEY.immediate = True
    try:
        yield HUEY
    finally:
        HUEY.immediate = before


@pytest.fixture
def courier_dirs(settings, tmp_path):
    for name, setting in (
        ("spool", "COURIER_SPOOL_DIR"),
        ("downloads", "COURIER_DOWNLOAD_DIR"),
        ("data", "DATA_DIR"),
    ):
        path = tmp_path / name
        path.mkdir()
        setattr(settings, setting, path)
    return tmp_path


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder user nobody can reach (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="courier-nobody-"))
    path.chmod(0o755)
    yield path
    for sub in path.rglob("*"):
        if sub.is_dir():
            sub.chmod(0o755)
    shutil.rmtree(path, ignore_errors=True)
