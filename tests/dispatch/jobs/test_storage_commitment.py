"""Storage Commitment as the requester (issue 13): a DICOM target with "Request
storage commitment" asks for commitment after each series and is done only when the
target committed every instance.

Peers: pynetdicom storage SCPs that are also Storage Commitment SCPs and answer on
the request's own association (all committed; some failed, then committed once
resent; never), one without Storage Commitment at all, and Orthanc (in
test_storage_commitment_orthanc.py), which reports on a new association to Courier's
receiver.
"""

from __future__ import annotations

import io
import ssl
import threading
import time
from dataclasses import dataclass, field

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StorageCommitmentPushModel,
    Verification,
)

from dispatch.jobs import engine, services, tasks
from dispatch.jobs.models import Commitment, InstanceState, State, StorageCommitment
from targets.models import DicomTarget, DicomTlsTarget
from tests.dicomgen import make_series
from tests.peers import free_port

pytestmark = pytest.mark.django_db(transaction=True)

SCP_AET = "COMMITSCP"


@dataclass
class CommitSCP:
    """A pynetdicom C-STORE SCP and Storage Commitment SCP on a free port.

    `mode`: "same" reports on the N-ACTION's association; "silent" never reports;
    `fail_first` SOP Instance UIDs are reported failed (0x0112) the first time they
    are asked for, committed after that.
    """

    mode: str = "same"
    fail_first: set[str] = field(default_factory=set)
    commitment: bool = True
    port: int = field(default_factory=free_port)
    stored: dict[str, int] = field(default_factory=dict)  # SOP Instance UID: times
    requests: list[tuple[str, list[str], str]] = field(default_factory=list)
    failed_once: set[str] = field(default_factory=set)
    asked: threading.Event = field(default_factory=threading.Event)
    ssl_context: object = None

    def __post_init__(self):
        ae = AE(SCP_AET)
        ae.add_supported_context(CTImageStorage)
        ae.add_supported_context(Verification)
        if self.commitment:
            ae.add_supported_context(StorageCommitmentPushModel)
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            ssl_context=self.ssl_context,
            evt_handlers=[
                (evt.EVT_C_STORE, self._store),
                (evt.EVT_N_ACTION, self._action),
            ],
        )

    def _store(self, event):
        uid = event.request.AffectedSOPInstanceUID
        self.stored[uid] = self.stored.get(uid, 0) + 1
        return 0x0000

    def _action(self, event):
        ds = event.action_information
        refs = [
            (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID)
            for item in ds.ReferencedSOPSequence
        ]
        self.requests.append(
            (ds.TransactionUID, [i for _, i in refs], event.assoc.requestor.ae_title)
        )
        self.asked.set()
        if self.mode in ("same", "crafted"):
            # The report cannot be sent from inside the handler (pynetdicom's
            # reactor thread would wait for its own answer): a moment later.
            threading.Thread(
                target=self._report, args=(event.assoc, ds.TransactionUID, refs)
            ).start()
        return 0x0000, None

    def _report(self, assoc, transaction_uid, refs):
        time.sleep(0.3)
        if self.mode == "crafted":
            # First a report of another transaction committing everything, then
            # ours leaving the last instance out and naming one never sent.
            self._send(assoc, generate_uid(), refs, [])
            refs = refs[:-1] + [(refs[0][0], generate_uid())]
            self._send(assoc, transaction_uid, refs, [])
            return
        ok, bad = [], []
        for cls, uid in refs:
            if uid in self.fail_first and uid not in self.failed_once:
                self.failed_once.add(uid)
                bad.append((cls, uid))
            elif uid in self.stored:
                ok.append((cls, uid))
            else:
                bad.append((cls, uid))
        self._send(assoc, transaction_uid, ok, bad)

    def _send(self, assoc, transaction_uid, ok, bad):
        ds = Dataset()
        ds.TransactionUID = transaction_uid

        def items(pairs, reason=None):
            out = []
            for cls, uid in pairs:
                item = Dataset()
                item.ReferencedSOPClassUID = cls
                item.ReferencedSOPInstanceUID = uid
                if reason is not None:
                    item.FailureReason = reason
                out.append(item)
            return DicomSequence(out)

        if ok:
            ds.ReferencedSOPSequence = items(ok)
        if bad:
            ds.FailedSOPSequence = items(bad, 0x0112)
        status, _ = assoc.send_n_event_report(
            ds, 2 if bad else 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1"
        )
        self.report_status = status.Status if status else None

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def scp_factory():
    made: list[CommitSCP] = []

    def make(**kwargs) -> CommitSCP:
        scp = CommitSCP(**kwargs)
        made.append(scp)
        return scp

    yield make
    for scp in made:
        scp.stop()


def commit_target(scp: CommitSCP, **fields) -> DicomTarget:
    return DicomTarget.objects.create(
        name=fields.pop("name", "committing"),
        host="127.0.0.1",
        port=scp.port,
        called_aet=SCP_AET,
        calling_aet="COURIER_SCU",
        retry_base_delay=3600,
        **{"request_commitment": True, **fields},
    )


def test_a_report_on_the_same_association_commits_every_instance(
    scp_factory, tmp_path, immediate_huey
):
    scp = scp_factory()
    series = make_series(tmp_path / "in", 4)
    target = commit_target(scp)
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    job.refresh_from_db()
    assert job.state == State.DONE, job.last_error
    assert (job.committed, job.total, job.committed_label) == (4, 4, "4 of 4 committed")
    # One request naming exactly what was stored, asked with Courier's own AET.
    ((uid, asked, calling),) = scp.requests
    assert sorted(asked) == sorted(series.sop_uids) == sorted(scp.stored)
    assert calling == "COURIER_SCU"
    assert set(job.instances.values_list("commitment", flat=True)) == {
        Commitment.COMMITTED
    }
    row = StorageCommitment.objects.get(transaction_uid=uid)
    assert row.outcome == StorageCommitment.Outcome.COMMITTED
    assert sorted(i for _, i in row.committed) == sorted(series.sop_uids)
    assert scp.report_status == 0x0000  # Courier answered the N-EVENT-REPORT


def test_instances_the_target_did_not_commit_are_named_resent_and_committed_next(
    scp_factory, tmp_path, immediate_huey
):
    series = make_series(tmp_path / "in", 5)
    lost = set(series.sop_uids[1:3])
    scp = scp_factory(fail_first=lost)
    target = commit_target(scp)
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    job.refresh_from_db()
    assert job.state == State.RETRY_WAIT
    assert job.committed_label == "3 of 5 committed"
    assert job.last_error.startswith("2 of 5 instances not committed by COMMITSCP (")
    assert "no such object instance (0x0112)" in job.last_error
    assert "sent again on the next attempt" in job.last_error
    pending = job.instances.filter(state=InstanceState.PENDING)
    assert set(pending.values_list("sop_instance_uid", flat=True)) == lost
    for row in pending:
        assert row.commitment == Commitment.FAILED
        assert row.message.startswith("not committed by COMMITSCP: no such object")

    assert services.retry_now([job]) == 1
    job.refresh_from_db()
    assert job.state == State.DONE, job.last_error
    assert job.committed_label == "5 of 5 committed"
    # Only the two were sent again, and only they were asked for again.
    assert {uid: n for uid, n in scp.stored.items() if n > 1} == dict.fromkeys(lost, 2)
    assert [sorted(r[1]) for r in scp.requests] == [
        sorted(series.sop_uids),
        sorted(lost),
    ]
    assert [a.outcome for a in job.attempts.all()] == ["error", "done"]


def test_a_report_of_another_transaction_or_leaving_an_instance_out_commits_nothing_unasked(
    scp_factory, tmp_path, immediate_huey
):
    """A peer's report is data: one for another transaction is answered and
    ignored, an instance it names but Courier never sent changes nothing, and one
    it leaves out is not committed (sent again next time)."""
    scp = scp_factory(mode="crafted")
    series = make_series(tmp_path / "in", 3)
    target = commit_target(scp)
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    job.refresh_from_db()
    assert job.state == State.RETRY_WAIT
    assert job.committed_label == "2 of 3 committed"
    left_out = job.instances.get(state=InstanceState.PENDING)
    assert left_out.sop_instance_uid == scp.requests[0][1][-1]
    assert left_out.message == (
        "not committed by COMMITSCP: not named in the target's report; sent again "
        "on the next attempt"
    )
    assert "1 of 3 instances not committed by COMMITSCP" in job.last_error
    assert scp.report_status == 0x0000


def test_a_dicom_tls_target_asks_for_commitment_over_tls_too(
    scp_factory, tmp_path, immediate_huey, pki
):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki["ca.pem"])
    ctx.load_cert_chain(pki["server.pem"], pki["server.key"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    scp = scp_factory(ssl_context=ctx)
    series = make_series(tmp_path / "in", 3)
    target = DicomTlsTarget.objects.create(
        name="tls-commit",
        host="127.0.0.1",
        port=scp.port,
        called_aet=SCP_AET,
        calling_aet="COURIER_SCU",
        tls_ca_cert=pki["ca.pem"],
        tls_client_cert=pki["client.pem"],
        tls_client_key=pki["client.key"],
        request_commitment=True,
        retry_base_delay=3600,
    )
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    job.refresh_from_db()
    assert job.state == State.DONE, job.last_error
    assert job.committed_label == "3 of 3 committed"
    ((_, asked, _),) = scp.requests
    assert sorted(asked) == sorted(series.sop_uids) == sorted(scp.stored)
    assert scp.report_status == 0x0000


def test_no_report_within_the_wait_fails_the_attempt_in_words_and_retries(
    scp_factory, tmp_path, immediate_huey, settings
):
    settings.COURIER_COMMITMENT_WAIT = 2
    scp = scp_factory(mode="silent")
    series = make_series(tmp_path / "in", 2)
    target = commit_target(scp)
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    job.refresh_from_db()
    assert job.state == State.RETRY_WAIT
    assert job.last_error.startswith(
        "no storage commitment report from COMMITSCP within 2 s"
    )
    assert "COURIER_SCU" in job.last_error  # the AE title to register
    assert job.committed_label == "0 of 2 committed"
    assert set(job.instances.values_list("state", "commitment")) == {
        (InstanceState.SENT, Commitment.WAITING)
    }
    # The lease and the target's connections are given back for the wait's end.
    assert (job.lease_owner, job.lease_expires_at) == ("", None)
    # The next attempt sends nothing again but asks again (a new transaction).
    scp.mode = "same"
    assert services.retry_now([job]) == 1
    job.refresh_from_db()
    assert job.state == State.DONE, job.last_error
    assert set(scp.stored.values()) == {1}
    assert len({r[0] for r in scp.requests}) == 2


def test_a_target_without_storage_commitment_fails_the_job_with_what_to_change(
    scp_factory, tmp_path, immediate_huey
):
    scp = scp_factory(commitment=False)
    series = make_series(tmp_path / "in", 2)
    target = commit_target(scp)
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    job.refresh_from_db()
    assert job.state == State.FAILED
    assert "did not accept the Storage Commitment Push Model" in job.last_error
    assert "'Request storage commitment'" in job.last_error
    assert len(scp.stored) == 2  # the series itself got there
    assert job.committed_label == "0 of 2 committed"


def test_the_test_button_says_whether_the_target_accepts_storage_commitment(
    scp_factory,
):
    with_it = scp_factory()
    without = scp_factory(commitment=False)
    yes = commit_target(with_it, name="yes").handler.test()
    assert yes.ok
    check = next(c for c in yes.checks if c.name == "Storage Commitment")
    assert check.ok and "accepts the Storage Commitment Push Model" in check.message
    no = commit_target(without, name="no").handler.test()
    assert not no.ok
    assert no.summary.startswith(
        "Storage Commitment failed: the target does not accept"
    )
    # Without the option the same target passes, the check only informs.
    off = commit_target(without, name="off", request_commitment=False).handler.test()
    assert off.ok
    check = next(c for c in off.checks if c.name == "Storage Commitment")
    assert check.informational and not check.ok


def test_a_worker_waiting_for_the_report_keeps_its_lease_and_stops_on_cancel(
    scp_factory, tmp_path, settings
):
    """The wait is far longer than the lease: the worker renews it all along (no
    other worker may take the job over), holds one connection, and Cancel ends
    the wait."""
    settings.COURIER_JOB_LEASE = 1.0
    settings.COURIER_COMMITMENT_WAIT = 600
    scp = scp_factory(mode="silent")
    series = make_series(tmp_path / "in", 3)
    target = commit_target(scp, max_connections=4)
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    ended = []
    worker = threading.Thread(
        target=lambda: ended.append(tasks.run_job(job.pk, worker="first"))
    )
    worker.start()
    try:
        assert scp.asked.wait(60), "no N-ACTION reached the target"
        time.sleep(3 * settings.COURIER_JOB_LEASE)  # three leases into the wait
        job.refresh_from_db()
        assert (job.state, job.lease_owner, job.connections) == (
            State.SENDING,
            "first",
            1,
        )
        assert engine.claim(job.pk, "second", True) is None
    finally:
        assert services.cancel([job]) == 1
        worker.join(60)
    assert not worker.is_alive()
    job.refresh_from_db()
    assert job.state == State.CANCELLED
    assert [(a.worker, a.outcome) for a in job.attempts.all()] == [
        ("first", "cancelled")
    ]
    assert (job.lease_owner, job.lease_expires_at) == ("", None)


def test_the_option_is_a_checkbox_of_dicom_targets_only(admin_client):
    from django.urls import reverse

    add = reverse("admin:targets_target_add")
    for kind in ("dicom", "dicom_tls"):
        html = admin_client.get(f"{add}?kind={kind}").content.decode()
        assert 'name="request_commitment"' in html
        assert "register Courier&#x27;s Source AET" in html
    for kind in ("dicomweb", "folder", "sftp", "s3", "rsync", "xnat"):
        html = admin_client.get(f"{add}?kind={kind}").content.decode()
        assert 'name="request_commitment"' not in html, kind


def test_send_series_and_job_status_print_how_many_were_committed(
    scp_factory, tmp_path
):
    from django.core.management import call_command

    scp = scp_factory()
    series = make_series(tmp_path / "in", 2)
    commit_target(scp, name="pacs")
    out = io.StringIO()
    call_command("send_series", "pacs", str(series.folder), stdout=out)
    assert "2 sent, 0 already present, 0 warnings, 0 failed of 2 instances" in (
        out.getvalue()
    )
    assert "; 2 of 2 committed;" in out.getvalue()
    job_id = out.getvalue().split("job ")[1].split(":")[0]
    status = io.StringIO()
    call_command("job_status", job_id, stdout=status)
    assert "storage commitment: 2 of 2 committed" in status.getvalue()
