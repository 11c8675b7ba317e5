"""S3 targets against SeaweedFS's S3 gateway on loopback (real signature checks)."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError

from targets.kinds.base import FAILED, PRESENT, SENT, TargetError
from targets.kinds.s3 import handler as s3_kind
from targets.models import S3Target
from targets.series import scan_folder
from tests.dicomgen import make_series
from tests.peers import free_port

pytestmark = pytest.mark.django_db


@pytest.fixture
def generated(tmp_path):
    return make_series(tmp_path / "src", 6)


@pytest.fixture(scope="module")
def bucket(seaweedfs) -> str:
    return seaweedfs.create_bucket(f"courier-{uuid.uuid4().hex[:10]}")


@pytest.fixture
def make_target(seaweedfs, bucket):
    def make(**fields) -> S3Target:
        values = {
            "name": f"s3-{uuid.uuid4().hex[:8]}",
            "bucket": bucket,
            "region": "us-east-1",
            "prefix": f"archive/{uuid.uuid4().hex[:8]}",
            "endpoint_url": seaweedfs.endpoint_url,
            "addressing_style": "path",
            "access_key_id": seaweedfs.admin.access_key,
            "secret_key": seaweedfs.admin.secret_key,
        }
        values.update(fields)
        return S3Target.objects.create(**values)

    return make


def expected_keys(target: S3Target, generated) -> dict[str, int]:
    return {
        f"{target.prefix}/{generated.study_uid}/{generated.series_uid}/{uid}.dcm": path.stat().st_size
        for uid, path in zip(generated.sop_uids, generated.files, strict=True)
    }


def test_it_uploads_one_object_per_instance_under_prefix_study_series(
    seaweedfs, make_target, generated
):
    target = make_target()
    seen = []
    result = target.handler.send(scan_folder(generated.folder), progress=seen.append)

    assert sorted(o.status for o in result.outcomes) == [SENT] * 6
    assert len(seen) == 6
    objects = seaweedfs.objects(target.bucket, target.prefix + "/")
    assert objects == expected_keys(target, generated)
    key = next(iter(objects))
    head = seaweedfs.client().head_object(Bucket=target.bucket, Key=key)
    assert head["ContentType"] == "application/dicom"
    body = seaweedfs.client().get_object(Bucket=target.bucket, Key=key)["Body"].read()
    uid = key.rsplit("/", 1)[1].removesuffix(".dcm")
    assert body == generated.files[generated.sop_uids.index(uid)].read_bytes()


def test_a_retry_sends_only_the_objects_that_are_missing(
    seaweedfs, make_target, generated
):
    target = make_target()
    target.handler.send(scan_folder(generated.folder))
    missing = next(iter(expected_keys(target, generated)))
    seaweedfs.client().delete_object(Bucket=target.bucket, Key=missing)

    result = target.handler.send(scan_folder(generated.folder))

    assert result.count(SENT) == 1 and result.count(PRESENT) == 5
    assert seaweedfs.objects(target.bucket, target.prefix + "/") == expected_keys(
        target, generated
    )


def test_large_files_go_up_as_multipart_uploads(
    seaweedfs, make_target, tmp_path, monkeypatch
):
    big = make_series(tmp_path / "big", 2, size=512)
    monkeypatch.setattr(s3_kind, "MULTIPART_THRESHOLD", 200 * 1024)
    monkeypatch.setattr(s3_kind, "MULTIPART_CHUNK", 5 * 1024 * 1024)
    target = make_target()

    assert target.handler.send(scan_folder(big.folder)).sent == 2

    objects = seaweedfs.objects(target.bucket, target.prefix + "/")
    assert sorted(objects.values()) == sorted(f.stat().st_size for f in big.files)
    head = seaweedfs.client().head_object(Bucket=target.bucket, Key=next(iter(objects)))
    assert "-" in head["ETag"]  # the ETag of a multipart upload: "<md5>-<parts>"
    assert head["ContentType"] == "application/dicom"


def checks_of(result) -> dict:
    return {c.name: c for c in result.checks}


def test_the_exclusion_filter_skips_matching_files(seaweedfs, make_target, generated):
    target = make_target(exclude="*00001.dcm")
    assert target.handler.send(scan_folder(generated.folder)).sent == 5


def test_test_passes_and_cleans_up_its_probe_object(seaweedfs, make_target):
    target = make_target()
    result = target.handler.test()
    assert result.ok, result.as_dict()
    assert [c.name for c in result.checks] == [
        "endpoint reachable",
        "credentials",
        "bucket reachable",
        "write probe",
    ]
    assert seaweedfs.objects(target.bucket, target.prefix + "/") == {}


def test_a_wrong_secret_says_authentication_failed_and_never_shows_the_secret(
    seaweedfs, make_target, generated, caplog
):
    caplog.set_level(logging.DEBUG)
    secret = "wrong-" + uuid.uuid4().hex
    target = make_target(secret_key=secret)

    result = target.handler.test()
    with pytest.raises(TargetError) as raised:
        target.handler.send(scan_folder(generated.folder))

    assert not result.ok
    assert checks_of(result)["credentials"].message.startswith(
        "authentication failed (signature does not match)"
    )
    assert raised.value.permanent
    assert raised.value.message.startswith(
        "authentication failed (signature does not match)"
    )
    for text in (raised.value.message, str(result.as_dict()), caplog.text):
        assert secret not in text
        assert "access denied" not in text.lower()


def test_an_unknown_access_key_says_authentication_failed(make_target):
    result = make_target(
        access_key_id="NOT-A-KEY-" + uuid.uuid4().hex[:6]
    ).handler.test()
    assert checks_of(result)["credentials"].message.startswith("authentication failed")


def test_a_missing_bucket_says_no_such_bucket_not_access_denied(make_target, generated):
    target = make_target(bucket=f"missing-{uuid.uuid4().hex[:10]}")

    result = target.handler.test()
    with pytest.raises(TargetError) as raised:
        target.handler.send(scan_folder(generated.folder))

    assert checks_of(result)["credentials"].ok
    bucket_check = checks_of(result)["bucket reachable"]
    assert not bucket_check.ok
    assert bucket_check.message.startswith("no such bucket")
    assert raised.value.message.startswith("no such bucket")
    assert raised.value.permanent


def test_read_only_credentials_say_access_denied_not_no_such_bucket(
    seaweedfs, make_target, generated
):
    target = make_target(
        access_key_id=seaweedfs.reader.access_key,
        secret_key=seaweedfs.reader.secret_key,
    )

    result = target.handler.test()
    with pytest.raises(TargetError) as raised:
        target.handler.send(scan_folder(generated.folder))

    assert [c.ok for c in result.checks] == [True, True, True, False]
    assert checks_of(result)["write probe"].message.startswith("access denied")
    assert raised.value.message.startswith("access denied")
    assert "no such bucket" not in raised.value.message
    assert raised.value.permanent


def test_a_missing_secret_is_named_by_the_test_and_the_send(make_target, generated):
    # As after the endpoint changed and the stored secret was cleared.
    target = make_target(secret_key="")

    result = target.handler.test()
    with pytest.raises(TargetError) as raised:
        target.handler.send(scan_folder(generated.folder))

    checks = checks_of(result)
    assert checks["endpoint reachable"].ok  # asked anonymously
    assert not checks["credentials"].ok
    words = f"the secret access key of {target.access_key_id} is not set"
    assert checks["credentials"].message.startswith(words)
    assert raised.value.permanent and raised.value.message.startswith(words)


@pytest.mark.parametrize(
    ("host", "words"),
    [
        ("127.0.0.1:{port}", "connection refused"),
        ("no-such-host.invalid:9000", "the host name does not resolve"),
    ],
)
def test_an_unreachable_endpoint_is_named_not_blamed_on_the_credentials(
    make_target, host, words
):
    endpoint = "http://" + host.format(port=free_port())
    result = make_target(endpoint_url=endpoint).handler.test()

    assert not result.ok
    (check,) = result.checks  # nothing is said about credentials or the bucket
    assert check.name == "endpoint reachable"
    assert check.message.startswith(
        f"endpoint unreachable: cannot connect to {endpoint}"
    )
    assert words in check.message
    # No request URL from the library, and the time the attempt took.
    assert "list-type" not in check.message and '"http' not in check.message
    assert check.duration_ms > 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("endpoint_url", "ftp://s3.example.org"),
        ("endpoint_url", "https://user:pw@s3.example.org"),
        ("endpoint_url", "https://s3.example.org:99999"),
        ("endpoint_url", "s3.example.org"),
        ("bucket", "Bad_Bucket"),
        ("bucket", "ab"),
        ("region", "eu central"),
        ("prefix", "a/../b"),
        ("storage_class", "standard ia"),
    ],
)
def test_bad_settings_are_form_errors(field, value):
    values = {
        "name": "x",
        "bucket": "good-bucket",
        "access_key_id": "minio-user",
        "secret_key": "s",
        field: value,
    }
    target = S3Target(**values)
    with pytest.raises(ValidationError) as raised:
        target.clean()
    assert field in raised.value.message_dict


def test_any_s3_compatible_endpoint_and_key_format_is_accepted():
    target = S3Target(
        name="x",
        bucket="dicom.archive-1",
        region="garage",
        prefix="/a/b/",
        endpoint_url="https://[2001:db8::1]:9000/",
        access_key_id="GK31c2f218a2e44f",
        secret_key="s",
    )
    target.clean()
    assert target.prefix == "a/b"
    assert target.endpoint_url == "https://[2001:db8::1]:9000"


def test_an_access_key_without_a_secret_is_a_form_error():
    target = S3Target(name="x", bucket="good-bucket", access_key_id="k")
    with pytest.raises(ValidationError) as raised:
        target.clean()
    assert "secret_key" in raised.value.message_dict


def test_an_empty_region_and_auto_addressing_work_with_a_compatible_endpoint(
    seaweedfs, make_target, generated
):
    target = make_target(region="", addressing_style="auto")
    assert target.handler.test().ok
    assert target.handler.send(scan_folder(generated.folder)).sent == 6
    assert seaweedfs.objects(target.bucket, target.prefix + "/") == expected_keys(
        target, generated
    )


def test_storage_class_and_server_side_encryption_are_sent(
    seaweedfs, make_target, generated
):
    target = make_target(storage_class="STANDARD", server_side_encryption="AES256")
    assert target.handler.send(scan_folder(generated.folder)).sent == 6
    key = next(iter(expected_keys(target, generated)))
    head = seaweedfs.client().head_object(Bucket=target.bucket, Key=key)
    assert head.get("ServerSideEncryption") == "AES256"


# -- parallel uploads: every object, its bytes, a failure by name --------------------


def bodies(seaweedfs, bucket: str, prefix: str) -> dict[str, bytes]:
    client = seaweedfs.client()
    return {
        key: client.get_object(Bucket=bucket, Key=key)["Body"].read()
        for key in seaweedfs.objects(bucket, prefix + "/")
    }


def test_parallel_uploads_put_every_object_with_its_own_bytes(
    seaweedfs, make_target, tmp_path
):
    many = make_series(tmp_path / "many", 3 * s3_kind.UPLOAD_THREADS)
    target = make_target()
    seen = []

    result = target.handler.send(scan_folder(many.folder), progress=seen.append)

    assert result.sent == len(many.files) == len(seen)
    stored = bodies(seaweedfs, target.bucket, target.prefix)
    assert stored == {
        f"{target.prefix}/{many.study_uid}/{many.series_uid}/{uid}.dcm": path.read_bytes()
        for uid, path in zip(many.sop_uids, many.files, strict=True)
    }


def test_an_object_the_store_refuses_fails_by_name_and_the_rest_arrive(
    seaweedfs, make_target, generated
):
    # An other file so deep that its key passes S3's 1,024-byte limit: SeaweedFS
    # answers KeyTooLongError for that object alone.
    deep = generated.folder.joinpath(*(c * 200 for c in "defg"))
    deep.mkdir(parents=True)
    (deep / ("r" * 200 + ".txt")).write_text("a report")
    target = make_target()

    result = target.handler.send(scan_folder(generated.folder))

    (failed,) = [o for o in result.outcomes if o.status != SENT]
    assert failed.path == str(deep / ("r" * 200 + ".txt"))
    assert failed.message.startswith("S3 error KeyTooLongError (400) while uploading ")
    assert "/" + "d" * 200 + "/" in failed.message  # the key it refused
    assert result.sent == 6
    assert bodies(seaweedfs, target.bucket, target.prefix) == {
        key: Path(path).read_bytes()
        for key, path in zip(
            expected_keys(target, generated), generated.files, strict=True
        )
    }


def test_a_file_gone_before_its_upload_fails_by_name_and_the_rest_arrive(
    seaweedfs, make_target, generated
):
    series = scan_folder(generated.folder)
    gone = generated.files[2]
    gone.unlink()
    target = make_target()

    result = target.handler.send(series)

    (failed,) = [o for o in result.outcomes if o.status != SENT]
    assert failed.status == FAILED and failed.path == str(gone)
    assert failed.message == f"cannot read {gone}: No such file or directory"
    assert result.sent == 5
    assert len(seaweedfs.objects(target.bucket, target.prefix + "/")) == 5


def test_a_refusal_of_the_target_stops_the_send_and_names_the_object(
    seaweedfs, make_target, generated
):
    target = make_target(
        access_key_id=seaweedfs.reader.access_key,
        secret_key=seaweedfs.reader.secret_key,
    )
    keys = expected_keys(target, generated)

    with pytest.raises(TargetError) as raised:
        target.handler.send(scan_folder(generated.folder))

    message = raised.value.message
    assert message.startswith("access denied while uploading ")
    assert any(key in message for key in keys)


def test_a_changed_secret_is_used_at_once_though_clients_are_reused(
    make_target, generated
):
    target = make_target()
    assert target.handler.client() is target.handler.client()  # one per settings
    good = target.secret_key
    target.secret_key = "changed-" + uuid.uuid4().hex
    target.save()

    with pytest.raises(TargetError) as raised:
        S3Target.objects.get(pk=target.pk).handler.send(scan_folder(generated.folder))
    assert raised.value.message.startswith("authentication failed")

    target.secret_key = good
    target.save()
    assert S3Target.objects.get(pk=target.pk).handler.send(
        scan_folder(generated.folder)
    ).sent == len(generated.files)
