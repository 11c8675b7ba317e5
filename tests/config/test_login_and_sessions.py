"""Logins are throttled, passwords validated, idle sessions end.

Through Django's test client against the real admin login view (django-axes counts
the failures in the database, as it does across gunicorn workers).
"""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.contrib.auth.password_validation import validate_password
from django.contrib.sessions.models import Session
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

LOGIN = reverse("admin:login")
GOOD = "correct horse battery 42"


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser("chief", "c@example.org", GOOD)


def login(client: Client, password: str, ip: str = "10.0.0.7", username="chief"):
    return client.post(
        LOGIN,
        {"username": username, "password": password, "next": "/admin/"},
        REMOTE_ADDR=ip,
    )


def test_repeated_failures_lock_that_user_and_address_out(admin_user, settings):
    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert login(client, "wrong").status_code == 200  # the form again

    locked = login(client, "wrong")
    right_password_too = login(client, GOOD)

    assert locked.status_code == 429
    assert right_password_too.status_code == 429
    assert "_auth_user_id" not in client.session
    # The real user elsewhere is not shut out by the guesser.
    assert login(Client(), GOOD, ip="10.0.0.8").status_code == 302
    attempt = AccessAttempt.objects.get(username="chief", ip_address="10.0.0.7")
    assert attempt.failures_since_start >= settings.AXES_FAILURE_LIMIT

    call_command("axes_reset", verbosity=0)
    assert login(client, GOOD).status_code == 302


def test_a_success_before_the_limit_resets_the_count(admin_user, settings):
    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        login(client, "wrong")
    assert login(client, GOOD).status_code == 302
    assert login(Client(), "wrong").status_code == 200


def test_a_username_with_a_line_break_cannot_forge_a_log_line(admin_user, caplog):
    caplog.set_level(logging.INFO, logger="axes")
    forged = "chief\n2026-01-01 level=INFO logger=courier.dispatch forged"
    for _ in range(6):
        login(Client(), "wrong", username=forged)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("axes")]
    assert any("forged" in line for line in lines)
    assert not any("\n" in line for line in lines)


def test_the_lockouts_are_listed_in_the_admin(admin_user, admin_client):
    login(Client(), "wrong")
    page = admin_client.get(reverse("admin:axes_accessattempt_changelist"))
    assert page.status_code == 200 and "chief" in page.content.decode()


@pytest.mark.parametrize(
    "password", ["short1", "password1234", "123456789012", "chief-example"]
)
def test_weak_passwords_are_refused(password, django_user_model):
    user = django_user_model(username="chief-example", email="c@example.org")
    with pytest.raises(ValidationError):
        validate_password(password, user)


def test_the_admin_refuses_a_weak_password_for_a_new_user(admin_client):
    response = admin_client.post(
        reverse("admin:auth_user_add"),
        {"username": "nurse", "password1": "nurse123", "password2": "nurse123"},
    )
    assert response.status_code == 200
    assert "too short" in response.content.decode()


def test_a_session_ends_when_idle_and_each_request_moves_its_deadline(
    admin_user, settings
):
    client = Client()
    assert login(client, GOOD).status_code == 302
    session = Session.objects.get()
    idle = timedelta(seconds=settings.SESSION_COOKIE_AGE)
    assert idle == timedelta(minutes=30)
    # A browser-session cookie, and a deadline on the server.
    assert not client.cookies["sessionid"]["max-age"]
    first = session.expire_date

    Session.objects.update(expire_date=timezone.now() + timedelta(minutes=1))
    assert client.get("/admin/").status_code == 200
    moved = Session.objects.get().expire_date
    assert moved > timezone.now() + idle - timedelta(minutes=1)
    assert moved >= first

    Session.objects.update(expire_date=timezone.now() - timedelta(seconds=1))
    response = client.get("/admin/")
    assert response.status_code == 302 and LOGIN in response["Location"]


def test_the_bare_host_leads_to_the_admin_home_and_anonymous_users_to_its_login(
    admin_user,
):
    # "/" used to be a bare 404: an admin typing only the host found nothing.
    anonymous = Client().get("/", follow=True)
    assert anonymous.redirect_chain == [
        ("/admin/", 302),
        (f"{LOGIN}?next=/admin/", 302),
    ]
    assert anonymous.status_code == 200
    assert b'name="password"' in anonymous.content

    client = Client()
    assert login(client, GOOD).status_code == 302
    staff = client.get("/", follow=True)
    assert staff.redirect_chain == [("/admin/", 302)]
    assert staff.status_code == 200
    assert staff.resolver_match.view_name == "admin:index"
