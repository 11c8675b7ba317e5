"""XNAT targets against the fake XNAT of tests/xnat_fake.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError

from targets.kinds.base import FAILED, SENT, TargetError
from targets.kinds.xnat.labels import render_label, uid_hash
from targets.models import XnatTarget
from targets.series import scan_folder
from tests.dicomgen import make_series
from tests.fixtures.web_peers import XNAT_PROJECTS, XNAT_USERS
from tests.peers import free_port
from tests.xnat_fake import XnatFake

REPO = Path(__file__).resolve().parents[3]


def xnat_target(url: str, **kwargs) -> XnatTarget:
    values = {
        "name": "xnat",
        "url": url,
        "project": "PROJ1",
        "username": "alice",
        "password": XNAT_USERS["alice"],
    }
    values.update(kwargs)
    return XnatTarget(**values)


def study(tmp_path, name: str, count: int = 3, **tags):
    tags.setdefault("StudyDate", "20260102")
    tags.setdefault("AccessionNumber", "")
    return make_series(tmp_path / name, count, patient_id="PAT-7", tags=tags)


def test_a_send_creates_the_session_with_the_expected_labels_and_files(
    xnat_fake, tmp_path
):
    gen = study(tmp_path, "s", 4)
    seen = []

    result = xnat_target(xnat_fake.url).handler.send(
        scan_folder(gen.folder), progress=seen.append
    )

    label = f"PAT-7_20260102_{uid_hash(gen.study_uid)}"
    [imported] = xnat_fake.imports_for("PROJ1", label)
    assert imported.subject == "PAT-7"
    assert imported.files == 4
    assert imported.dest == "/prearchive"
    assert imported.overwrite == "none"
    assert imported.import_handler == "DICOM-zip"
    assert result.sent == 4 and [o.status for o in seen] == [SENT] * 4
    assert any(label in note for note in result.notes)


def test_gradual_dicom_posts_each_file_into_one_session(xnat_fake, tmp_path):
    gen = study(tmp_path, "s", 3)
    target = xnat_target(
        xnat_fake.url,
        import_handler="gradual-DICOM",
        session_template="{PatientID}_grad_{StudyUIDHash}",
    )
    seen = []

    result = target.handler.send(scan_folder(gen.folder), progress=seen.append)

    [imported] = xnat_fake.imports_for("PROJ1", f"PAT-7_grad_{uid_hash(gen.study_uid)}")
    assert imported.import_handler == "gradual-DICOM"
    assert imported.files == 3 and imported.subject == "PAT-7"
    assert result.sent == 3 and [o.status for o in seen] == [SENT] * 3


def test_gradual_dicom_reports_a_refused_file_and_sends_the_rest(xnat_fake, tmp_path):
    gen = study(tmp_path, "s", 3)
    series = scan_folder(gen.folder)
    notes = tmp_path / "notes.txt"
    notes.write_text("not DICOM")
    series.instances[1].path = notes
    target = xnat_target(
        xnat_fake.url,
        import_handler="gradual-DICOM",
        session_template="{PatientID}_g2_{StudyUIDHash}",
    )

    result = target.handler.send(series)

    assert [o.status for o in result.outcomes] == [SENT, FAILED, SENT]
    assert "not a DICOM file" in result.outcomes[1].message
    [imported] = xnat_fake.imports_for("PROJ1", f"PAT-7_g2_{uid_hash(gen.study_uid)}")
    assert imported.files == 2


def test_two_studies_of_one_patient_on_one_day_get_different_sessions(
    xnat_fake, tmp_path
):
    first = study(tmp_path, "a", 1)
    second = study(tmp_path, "b", 1)
    handler = xnat_target(xnat_fake.url).handler

    labels = {handler.labels(scan_folder(g.folder))[1] for g in (first, second)}

    assert len(labels) == 2


def test_an_archive_destination_is_checked_and_a_second_import_is_refused(
    xnat_fake, tmp_path
):
    gen = study(tmp_path, "s", 2)
    target = xnat_target(
        xnat_fake.url,
        destination="archive",
        session_template="{PatientID}_arch_{StudyUIDHash}",
    )
    target.handler.send(scan_folder(gen.folder))
    label = f"PAT-7_arch_{uid_hash(gen.study_uid)}"
    assert xnat_fake.imports_for("PROJ1", label)[0].dest == "/archive"

    with pytest.raises(TargetError) as exc:
        target.handler.send(scan_folder(gen.folder))
    assert exc.value.permanent
    assert "already exists" in str(exc.value) and "overwrite policy is none" in str(
        exc.value
    )

    target.overwrite = "append"
    assert target.handler.send(scan_folder(gen.folder)).sent == 2


def test_templates_may_use_any_dicom_keyword(xnat_fake, tmp_path):
    # StationName is not one of the routing tags read at scan time.
    gen = study(tmp_path, "s", 1, AccessionNumber="ACC 42", StationName="ST1")
    target = xnat_target(
        xnat_fake.url,
        subject_template="{PatientID}",
        session_template="{AccessionNumber}_{Modality}_{StationName}",
    )

    assert target.handler.labels(scan_folder(gen.folder)) == ("PAT-7", "ACC_42_CT_ST1")


@pytest.mark.parametrize("destination", ["prearchive", "archive"])
def test_an_import_whose_session_is_not_there_afterwards_is_an_error(
    xnat_fake, tmp_path, destination
):
    gen = study(tmp_path, "s", 1)
    target = xnat_target(xnat_fake.url, destination=destination)
    xnat_fake.lose_imports = True
    try:
        with pytest.raises(TargetError) as exc:
            target.handler.send(scan_folder(gen.folder))
    finally:
        xnat_fake.lose_imports = False
    assert "is not there afterwards" in str(exc.value)
    assert not exc.value.permanent


def test_a_missing_tag_is_an_error_naming_it(xnat_fake, tmp_path):
    gen = study(tmp_path, "s", 1)  # AccessionNumber empty
    target = xnat_target(
        xnat_fake.url, session_template="{PatientID}_{AccessionNumber}"
    )

    with pytest.raises(TargetError) as exc:
        target.handler.send(scan_folder(gen.folder))

    assert exc.value.permanent
    assert "no AccessionNumber" in str(exc.value)


def test_a_wrong_password_fails_the_login_check_and_the_send(xnat_fake, tmp_path):
    target = xnat_target(xnat_fake.url, password="wrong")

    result = target.handler.test()
    checks = {c.name: c for c in result.checks}
    assert checks["Reachable"].ok
    assert not checks["Login"].ok
    assert "login failed" in checks["Login"].message
    assert "wrong" not in json.dumps(result.as_dict())

    with pytest.raises(TargetError) as exc:
        target.handler.send(scan_folder(study(tmp_path, "s", 1).folder))
    assert exc.value.permanent and "login failed" in str(exc.value)


@pytest.mark.parametrize(
    ("project", "user", "check", "words"),
    [
        ("NOSUCH", "alice", "Project", "does not exist"),
        ("PRIVATE", "alice", "Project", "has no access"),
        ("READONLY", "alice", "Upload permission", "not upload"),
        ("PROJ1", "bob", "Project", "has no access"),
    ],
)
def test_project_problems_are_failed_checks(xnat_fake, project, user, check, words):
    target = xnat_target(
        xnat_fake.url, project=project, username=user, password=XNAT_USERS[user]
    )
    result = target.handler.test()
    checks = {c.name: c for c in result.checks}
    assert checks["Login"].ok
    assert not checks[check].ok
    assert words in checks[check].message


@pytest.mark.parametrize(
    ("project", "words"),
    [("NOSUCH", "does not exist"), ("READONLY", "may not upload")],
)
def test_project_problems_are_permanent_send_errors(
    xnat_fake, tmp_path, project, words
):
    with pytest.raises(TargetError) as exc:
        xnat_target(xnat_fake.url, project=project).handler.send(
            scan_folder(study(tmp_path, "s", 1).folder)
        )
    assert exc.value.permanent
    assert words in str(exc.value)


def test_the_test_passes_for_a_writable_project(xnat_fake):
    result = xnat_target(xnat_fake.url).handler.test()
    assert result.ok, result.summary
    assert [c.name for c in result.checks] == [
        "Reachable",
        "XNAT server",
        "Login",
        "Project",
        "Upload permission",
    ]
    assert result.checks[1].message == f"XNAT {xnat_fake.version}"


def test_a_url_that_is_not_an_xnat_says_so_not_that_the_password_is_wrong(
    orthanc, tmp_path
):
    # An easy mistake: the PACS's web address instead of the XNAT's.
    url = f"http://127.0.0.1:{orthanc.http_port}"
    result = xnat_target(url).handler.test()

    checks = {c.name: c for c in result.checks}
    assert checks["Reachable"].ok
    assert not checks["XNAT server"].ok
    message = checks["XNAT server"].message
    assert message.startswith(f"not an XNAT server: 127.0.0.1:{orthanc.http_port}")
    assert "HTTP 404" in message
    assert "Login" not in checks and "password" not in message
    # A send says the same, from the login the xnat package attempts.
    with pytest.raises(TargetError) as exc:
        xnat_target(url).handler.send(scan_folder(study(tmp_path, "s", 1).folder))
    assert exc.value.permanent
    assert str(exc.value).startswith("not an XNAT server")
    assert "password" not in str(exc.value)


def test_a_closed_port_is_a_failed_check_and_a_transient_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = xnat_target(url).handler.test()
    assert not result.ok and "connection refused" in result.checks[0].message
    with pytest.raises(TargetError) as exc:
        xnat_target(url).handler.send(scan_folder(study(tmp_path, "s", 1).folder))
    assert not exc.value.permanent


def test_the_fake_refuses_a_zip_with_a_non_dicom_member(xnat_fake, tmp_path):
    # The handler only ever zips DICOM files; this checks the fake behaves like
    # XNAT, so the 400 path of the handler is exercised for real.
    gen = study(tmp_path, "s", 1)
    series = scan_folder(gen.folder)
    notes = tmp_path / "notes.txt"
    notes.write_text("not DICOM")
    series.instances[0].path = notes
    with pytest.raises(TargetError) as exc:
        xnat_target(xnat_fake.url).handler.send(series)
    assert exc.value.permanent
    assert "refused the import" in str(exc.value) and "not a DICOM file" in str(
        exc.value
    )


def test_labels_are_made_safe_for_xnat():
    tags = {"PatientID": "Müller/7 ", "StudyInstanceUID": "1.2.3"}
    assert render_label("{PatientID}_{StudyUIDHash}", tags, "session") == (
        f"M_ller_7_{uid_hash('1.2.3')}"
    )


@pytest.mark.parametrize(
    ("values", "field", "words"),
    [
        ({"url": "xnat.example.org"}, "url", "http:// or https://"),
        ({"url": "file:///tmp"}, "url", "http:// or https://"),
        ({"project": "My Project"}, "project", "project ID"),
        (
            {"session_template": "{PatientID}_{StudyDay}"},
            "session_template",
            "{StudyDay}",
        ),
        ({"subject_template": "fixed"}, "subject_template", "at least one"),
        ({"password": ""}, "password", "password"),
    ],
)
def test_bad_settings_are_form_errors(values, field, words):
    target = xnat_target(**{"url": "https://xnat.example.org", **values})
    with pytest.raises(ValidationError) as exc:
        target.clean()
    assert words in " ".join(exc.value.message_dict[field])


def test_good_settings_pass_validation():
    xnat_target(
        "https://xnat.example.org",
        session_template="{PatientID}_{StudyDate}_{StudyUIDHash}_{SeriesNumber}",
    ).clean()


SEND_IN_SUBPROCESS = textwrap.dedent(
    """
    import json, sys
    import django
    django.setup()
    import requests  # noqa: F401 - loaded before the baseline, like the handler will
    from targets.models import XnatTarget
    from targets.series import scan_folder

    def peak_kb():
        # This process's own peak (ru_maxrss would include the parent's).
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    series = scan_folder(sys.argv[1])
    target = XnatTarget(name="big", url=sys.argv[2], project="PROJ1",
                        username="alice", password=sys.argv[3],
                        session_template="{PatientID}_big_{StudyUIDHash}")
    # The handler and what it imports (pydicom, numpy: django.setup() no longer
    # loads them) before the baseline too: the growth measured is the upload's.
    handler = target.handler
    before = peak_kb()
    result = handler.send(series)
    print(json.dumps({"sent": result.sent, "before_kb": before, "peak_kb": peak_kb()}))
    """
)


def test_a_large_series_is_zipped_and_uploaded_without_holding_it_in_memory(
    xnat_fake, tmp_path
):
    # 200 instances of 531 KB: a 106 MB series.
    gen = make_series(tmp_path / "big", 200, size=512, patient_id="BIG")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "COURIER_DATA_DIR": str(tmp_path / "data"),
    }

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SEND_IN_SUBPROCESS,
            str(gen.folder),
            xnat_fake.url,
            XNAT_USERS["alice"],
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["sent"] == 200
    growth = (figures["peak_kb"] - figures["before_kb"]) * 1024
    assert growth < 24 * 1024**2, figures
    [imported] = xnat_fake.imports_for("PROJ1", f"BIG_big_{uid_hash(gen.study_uid)}")
    assert imported.files == 200
    assert not list((tmp_path / "data" / "tmp").iterdir())  # the zip is gone
    shutil.rmtree(gen.folder)


@pytest.fixture
def https_xnat(pki):
    """The fake XNAT over HTTPS, with a certificate from the test CA."""
    with XnatFake(
        XNAT_USERS, XNAT_PROJECTS, tls=(pki["server.pem"], pki["server.key"])
    ) as fake:
        yield fake


def test_an_https_xnat_is_trusted_through_the_targets_ca_bundle(
    https_xnat, pki, tmp_path
):
    # Before the one HTTP seam, XNAT ignored the CA bundle (the field was not even
    # on its form): an XNAT with a private CA could not be used with verification on.
    target = xnat_target(https_xnat.url, ca_bundle=pki["ca.pem"])
    target.full_clean(exclude=["name"])

    result = target.handler.test()
    assert result.ok, result.summary

    sent = target.handler.send(scan_folder(study(tmp_path, "s", 2).folder))
    assert sent.sent == 2
    assert len(https_xnat.imports) == 1


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({}, "not trusted"),
        ({"ca_bundle": "other-ca.pem"}, "not trusted"),
        ({"verify_tls": False, "ca_bundle": "other-ca.pem"}, None),
    ],
)
def test_xnat_verifies_tls_as_the_target_says(https_xnat, pki, settings, words):
    values = {k: pki[v] if k == "ca_bundle" else v for k, v in settings.items()}
    result = xnat_target(https_xnat.url, **values).handler.test()
    if words is None:
        assert result.ok, result.summary
    else:
        assert not result.checks[0].ok and words in result.checks[0].message


def test_an_unreadable_ca_bundle_is_a_form_error_for_xnat(tmp_path):
    with pytest.raises(ValidationError) as exc:
        xnat_target(
            "https://xnat.example.org", ca_bundle=str(tmp_path / "no.pem")
        ).clean()
    assert "does not exist" in str(exc.value.message_dict["ca_bundle"])
