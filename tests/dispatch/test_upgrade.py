"""A database of the version before dispatch was split in three, upgraded in place.

Issue 14 split `dispatch` into the apps jobs (still labelled `dispatch`), routing
and receiving, renamed `Target.max_associations` and `Job.associations` to
`..._connections`, and put the query tool's retrievals on the jobs engine's lease.
A site's database, migrated to the last migrations before that (`OLD_HEAD`) and
holding rows of every kind, is migrated to the new head here, on SQLite and on
PostgreSQL: its tables keep their names and rows, its schema ends as a fresh
database's, the models read the old rows, and the permissions granted on the moved
models still hold. The upgraded PostgreSQL database then serves a real send.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

import pytest
from django.db import connections
from django.db.migrations.executor import MigrationExecutor
from django.db.utils import load_backend
from django.utils import timezone
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

from targets.models import DicomTarget
from tests.dicomgen import make_series

# The last migration of each app issue 14 changed, before it (main at c4483dc);
# the other apps (Django's, axes) at their own last.
OLD_HEAD = {
    "targets": "0004_target_export_groups",
    "dispatch": "0006_other_files",
    "querytool": "0003_query_permissions",
}
NEW_APPS = ("routing", "receiving")
MOVED_TABLES = {
    "dispatch_rule",
    "dispatch_rule_targets",
    "dispatch_rulecondition",
    "dispatch_receivedseries",
    "dispatch_receivedseries_jobs",
    "dispatch_receivedseries_matched_rules",
    "dispatch_receiverstatus",
}

# Tables of models added after the three-app split (new, not moved).
TABLES_ADDED_SINCE = {"dispatch_storagecommitment"}  # 0009_storage_commitment


def _connect(alias: str, **settings):
    """A connection of its own (not the test database), registered as `alias`."""
    config = {**connections["default"].settings_dict, **settings, "CONN_MAX_AGE": 0}
    wrapper = load_backend(config["ENGINE"]).DatabaseWrapper(config, alias)
    connections[alias] = wrapper
    return wrapper


def _forget(alias: str) -> None:
    connections[alias].close()
    del connections[alias]


def _migrate(conn, *, old_head: bool = False) -> MigrationExecutor:
    """Migrate to the new head, or to the old one (where the new apps were not)."""
    executor = MigrationExecutor(conn)
    targets = executor.loader.graph.leaf_nodes()
    if old_head:
        targets = [
            (app, OLD_HEAD.get(app, name))
            for app, name in targets
            if app not in NEW_APPS
        ]
    executor.migrate(targets)
    return executor


def _schema(conn) -> dict[str, tuple[set, set]]:
    """Every table's columns (name, type, null) and constraints (by what they do,
    not by name), as the database reports them."""
    found = {}
    intro = conn.introspection
    with conn.cursor() as cursor:
        for table in intro.table_names(cursor):
            if table == "django_migrations":
                continue
            columns = {
                (c.name, intro.get_field_type(c.type_code, c), bool(c.null_ok))
                for c in intro.get_table_description(cursor, table)
            }
            constraints = {
                (
                    tuple(c["columns"] or ()),
                    c["primary_key"],
                    c["unique"],
                    tuple(c["foreign_key"] or ()),
                    c["check"],
                    c["index"],
                )
                for c in intro.get_constraints(cursor, table).values()
            }
            found[table] = (columns, constraints)
    return found


def _fill_old_head(executor: MigrationExecutor, db: str) -> dict[str, int]:
    """Rows of every moved or renamed model, written with the old models."""
    old = executor.loader.project_state(list(OLD_HEAD.items())).apps

    def model(label):
        return old.get_model(*label.split(".")).objects.using(db)

    target = model("targets.Target").create(
        name="archive", kind="folder", path="/srv/archive", max_associations=5
    )
    job = model("dispatch.Job").create(
        target=target, folder="/spool/incoming/s1", source="route", associations=3,
        state="done", total=2, sent=2,
    )  # fmt: skip
    model("dispatch.Attempt").create(job=job, number=1, worker="w", outcome="done")
    model("dispatch.JobInstance").create(
        job=job, path="/spool/incoming/s1/1.dcm", sop_instance_uid="1.2.3.1",
        state="sent",
    )  # fmt: skip
    rule = model("dispatch.Rule").create(name="CT to the archive", order=10)
    rule.targets.add(target)
    model("dispatch.RuleCondition").create(
        rule=rule, field="tag", keyword="Modality", operator="exact", value="CT"
    )
    series = model("dispatch.ReceivedSeries").create(
        series_uid="1.2.3", folder="/spool/incoming/s1", state="routed",
        calling_aet="CT_1", tags={"Modality": "CT"}, instance_count=2,
    )  # fmt: skip
    series.matched_rules.add(rule)
    series.jobs.add(job)
    model("dispatch.ReceiverStatus").create(name="COURIER@11112", refused_count=4)
    retrieval = model("querytool.RetrievalJob").create(
        source=target, source_name="archive", study_uid="1.2.3", state="running",
        heartbeat_at=timezone.now() - timedelta(hours=1), download=True,
    )  # fmt: skip
    # Content types and a permission on a moved model, granted to a group, as
    # `migrate` and an administrator had left them.
    types = {
        name: model("contenttypes.ContentType").create(app_label="dispatch", model=name)
        for name in ("job", "rule", "receivedseries", "receiverstatus")
    }
    change_rule = model("auth.Permission").create(
        codename="change_rule", name="Can change rule", content_type=types["rule"]
    )
    model("auth.Group").create(name="routing admins").permissions.add(change_rule)
    return {
        "target": target.pk,
        "job": job.pk,
        "rule": rule.pk,
        "series": series.pk,
        "retrieval": retrieval.pk,
        **{f"type:{name}": t.pk for name, t in types.items()},
    }


@dataclass
class Upgraded:
    alias: str  # the upgraded database's connection
    rows: dict[str, int]  # what was written at the old head
    tables_before: set[str]
    fresh: str  # a database migrated fresh to the new head, to compare with


def _upgrade(alias: str, fresh: str) -> Upgraded:
    rows = _fill_old_head(_migrate(connections[alias], old_head=True), alias)
    before = set(connections[alias].introspection.table_names())
    _migrate(connections[alias])
    return Upgraded(alias, rows, before, fresh)


@pytest.fixture
def sqlite_upgraded(tmp_path, django_db_blocker):
    _connect("upgraded", NAME=str(tmp_path / "old.sqlite3"))
    try:
        with django_db_blocker.unblock():
            # The test database is migrated fresh to the new head.
            yield _upgrade("upgraded", "default")
    finally:
        _forget("upgraded")


@pytest.fixture(scope="module")
def postgres_upgraded(postgres_server, django_db_blocker):
    """A PostgreSQL database upgraded from the old head (kept for the module: the
    send test below uses it), and one `manage.py migrate` made fresh."""
    names = {
        "old": postgres_server.create_database(f"upgrade_{uuid.uuid4().hex[:8]}"),
        "fresh": postgres_server.migrated_database(f"fresh_{uuid.uuid4().hex[:8]}"),
    }
    aliases = {"old": "pg-upgraded", "fresh": "pg-fresh"}
    for key, alias in aliases.items():
        _connect(
            alias,
            ENGINE="django.db.backends.postgresql",
            NAME=names[key].rsplit("/", 1)[-1],
            USER="postgres",
            PASSWORD="",
            HOST="127.0.0.1",
            PORT=str(postgres_server.port),
            OPTIONS={},
        )
    try:
        with django_db_blocker.unblock():
            yield _upgrade(aliases["old"], aliases["fresh"])
    finally:
        for alias in aliases.values():
            _forget(alias)


@pytest.mark.django_db
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_database_at_the_old_head_upgrades_to_the_three_apps(backend, request):
    upgraded: Upgraded = request.getfixturevalue(
        {"sqlite": "sqlite_upgraded", "postgresql": "postgres_upgraded"}[backend]
    )
    db = connections[upgraded.alias]

    # Every table kept its name (and no new one appeared for the moved models;
    # only the new models of later migrations add theirs).
    after = set(db.introspection.table_names())
    assert MOVED_TABLES <= upgraded.tables_before
    assert after == upgraded.tables_before | TABLES_ADDED_SINCE
    assert _schema(db) == _schema(connections[upgraded.fresh])
    _assert_rows_read_by_the_new_models(upgraded.rows, upgraded.alias)
    # Nothing left to migrate, and nothing for `makemigrations` to write.
    executor = MigrationExecutor(db)
    assert not executor.migration_plan(executor.loader.graph.leaf_nodes())


def _assert_rows_read_by_the_new_models(rows: dict[str, int], db: str) -> None:
    from django.contrib.auth.models import Group
    from django.contrib.contenttypes.models import ContentType

    from dispatch.jobs.models import Job
    from dispatch.receiving.models import ReceiverStatus
    from dispatch.routing.models import ReceivedSeries, Rule
    from querytool.models import RetrievalJob, RetrievalState
    from querytool.retrieval import abandoned
    from targets.models import Target

    assert Target.objects.using(db).get(pk=rows["target"]).max_connections == 5
    job = Job.objects.using(db).get(pk=rows["job"])
    assert (job.connections, job.attempts.count(), job.instances.count()) == (3, 1, 1)
    rule = Rule.objects.using(db).get(pk=rows["rule"])
    assert [str(c) for c in rule.conditions.all()] == ["Modality is exactly 'CT'"]
    assert list(rule.targets.values_list("name", flat=True)) == ["archive"]
    series = ReceivedSeries.objects.using(db).get(pk=rows["series"])
    assert list(series.matched_rules.all()) == [rule]
    assert list(series.jobs.all()) == [job]
    assert list(job.received.all()) == [series]
    assert ReceiverStatus.objects.using(db).get().refused_count == 4
    # A retrieval the old version left running has no lease: abandoned.
    running = RetrievalJob.objects.using(db).filter(abandoned(timezone.now()))
    assert list(running.values_list("pk", "state")) == [
        (rows["retrieval"], RetrievalState.RUNNING)
    ]
    # The moved models' content types moved with them: the group's permission
    # holds for routing's rules now; the jobs' stay the dispatch app's.
    types = ContentType.objects.db_manager(db)
    assert {
        name: types.get(pk=rows[f"type:{name}"]).app_label
        for name in ("job", "rule", "receivedseries", "receiverstatus")
    } == {
        "job": "dispatch",
        "rule": "routing",
        "receivedseries": "routing",
        "receiverstatus": "receiving",
    }
    granted = Group.objects.using(db).get(name="routing admins").permissions.get()
    assert (granted.content_type.app_label, granted.codename) == (
        "routing",
        "change_rule",
    )


# -- the upgraded PostgreSQL database in service ----------------------------------------


@pytest.fixture
def nul_commenting_pacs():
    """A PACS refusing every instance with an Error Comment holding a NUL byte."""

    def refuse(event):
        status = Dataset()
        status.Status = 0xC000
        status.ErrorComment = "disk\x00full"
        return status

    ae = AE(ae_title="NULPACS")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, refuse)]
    )
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def test_a_nul_in_a_peers_error_comment_does_not_fail_the_status_write_on_postgresql(
    courier_site,
    postgres_server,
    postgres_upgraded,
    nul_commenting_pacs,
    tmp_path,
    django_db_blocker,
):
    """A PACS's words reach `Job.last_error`, `Attempt.error` and
    `JobInstance.message` without the NUL PostgreSQL refuses (before: the batch of
    outcomes failed to write, and the job ended in "unexpected error: DataError"
    with its instances never recorded). `send_series` runs as a process on the
    database upgraded above."""
    db = connections[postgres_upgraded.alias].settings_dict["NAME"]
    site = courier_site(
        database_url=f"postgres://postgres@127.0.0.1:{postgres_server.port}/{db}",
        pg=postgres_server,
    )
    with django_db_blocker.unblock():
        DicomTarget.objects.using(postgres_upgraded.alias).create(
            name="nul-pacs", host="127.0.0.1", port=nul_commenting_pacs,
            called_aet="NULPACS",
        )  # fmt: skip
    series = make_series(tmp_path / "ct", 2)

    sent = site.manage("send_series", "nul-pacs", str(series.folder), check=False)

    assert sent.returncode == 1, sent.stdout + sent.stderr
    assert "DataError" not in sent.stdout + sent.stderr
    ((job, state, failed, last_error),) = site.query(
        "SELECT j.id, j.state, j.failed, j.last_error FROM dispatch_job j "
        "JOIN targets_target t ON t.id = j.target_id WHERE t.name = 'nul-pacs'"
    )
    assert (state, failed) == ("failed", 2)
    assert "failed with status 0xc000" in last_error and "(diskfull)" in last_error
    messages = site.query(
        "SELECT state, message FROM dispatch_jobinstance WHERE job_id = %s", (job,)
    )
    assert [s for s, _ in messages] == ["failed", "failed"]
    assert all(m.endswith("(diskfull)") for _, m in messages), messages
    ((error,),) = site.query(
        "SELECT error FROM dispatch_attempt WHERE job_id = %s", (job,)
    )
    assert "(diskfull)" in error
