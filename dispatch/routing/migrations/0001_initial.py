import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models

# Models that were the `dispatch` app's before routing became an app of its own.
MOVED = ("rule", "rulecondition", "receivedseries")


def adopt_content_types(apps, schema_editor):
    """Move the models' content types over, so that the permissions granted on them
    (and the admin's history) stay with them."""
    content_type = apps.get_model("contenttypes", "ContentType")
    db = schema_editor.connection.alias
    taken = set(
        content_type.objects.using(db)
        .filter(app_label="routing", model__in=MOVED)
        .values_list("model", flat=True)
    )
    content_type.objects.using(db).filter(
        app_label="dispatch", model__in=[m for m in MOVED if m not in taken]
    ).update(app_label="routing")


def give_back_content_types(apps, schema_editor):
    content_type = apps.get_model("contenttypes", "ContentType")
    db = schema_editor.connection.alias
    content_type.objects.using(db).filter(
        app_label="routing", model__in=MOVED
    ).update(app_label="dispatch")


class Migration(migrations.Migration):
    """Take over the rules and received series from the `dispatch` app: state only,
    the tables (created by `dispatch.0003_routing`) keep their names and rows."""

    initial = True

    dependencies = [
        ("contenttypes", "0002_remove_content_type_name"),
        ("dispatch", "0008_routing_and_receiving_apps"),
        ("targets", "0005_rename_max_associations_max_connections"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="Rule",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                        ("name", models.CharField(max_length=100, unique=True)),
                        ("enabled", models.BooleanField(default=True)),
                        ("order", models.IntegerField(default=100, help_text="Rules are shown and evaluated in this order.")),
                        ("match", models.CharField(choices=[("all", "All conditions"), ("any", "Any condition")], default="all", max_length=3)),
                        ("description", models.TextField(blank=True)),
                        ("created_at", models.DateTimeField(auto_now_add=True)),
                        ("updated_at", models.DateTimeField(auto_now=True)),
                        ("targets", models.ManyToManyField(help_text="Each matching series gets one job per target.", limit_choices_to=models.Q(("direction__in", ["store", "both"])), related_name="rules", to="targets.target")),
                    ],
                    options={
                        "db_table": "dispatch_rule",
                        "ordering": ["order", "name"],
                    },
                ),
                migrations.CreateModel(
                    name="RuleCondition",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                        ("field", models.CharField(choices=[("calling_aet", "Calling AE title (the sender)"), ("called_aet", "Called AE title (what the sender called)"), ("tag", "DICOM tag")], default="tag", max_length=12)),
                        ("keyword", models.CharField(blank=True, help_text="For a DICOM tag: its keyword, e.g. Modality, StudyDescription, SeriesDescription, BodyPartExamined.", max_length=64, verbose_name="tag keyword")),
                        ("operator", models.CharField(choices=[("exact", "is exactly"), ("wildcard", "matches wildcard (* and ?)"), ("regex", "matches regular expression")], default="exact", max_length=8)),
                        ("value", models.CharField(blank=True, help_text="Compared case-sensitively, as DICOM does; a regular expression must match the whole value (use (?i) to ignore case).", max_length=200)),
                        ("rule", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="conditions", to="routing.rule")),
                    ],
                    options={
                        "db_table": "dispatch_rulecondition",
                        "ordering": ["rule", "id"],
                    },
                ),
                migrations.CreateModel(
                    name="ReceivedSeries",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                        ("series_uid", models.CharField(db_index=True, max_length=64, verbose_name="Series Instance UID")),
                        ("study_uid", models.CharField(blank=True, max_length=64, verbose_name="Study Instance UID")),
                        ("folder", models.CharField(max_length=1000, unique=True)),
                        ("calling_aet", models.CharField(blank=True, max_length=16, verbose_name="calling AE title")),
                        ("called_aet", models.CharField(blank=True, max_length=16, verbose_name="called AE title")),
                        ("peer_address", models.CharField(blank=True, max_length=100, verbose_name="sender address")),
                        ("first_received_at", models.DateTimeField(default=django.utils.timezone.now)),
                        ("last_received_at", models.DateTimeField(db_index=True, default=django.utils.timezone.now)),
                        ("instance_count", models.PositiveIntegerField(default=0, verbose_name="instances")),
                        ("bytes", models.PositiveBigIntegerField(default=0)),
                        ("tags", models.JSONField(blank=True, default=dict, verbose_name="tags summary")),
                        ("state", models.CharField(choices=[("receiving", "Receiving"), ("complete", "Complete, waiting to be routed"), ("routed", "Routed"), ("unrouted", "Unrouted (no rule matched)"), ("failed", "Failed")], db_index=True, default="receiving", max_length=12)),
                        ("state_changed_at", models.DateTimeField(default=django.utils.timezone.now)),
                        ("routed_at", models.DateTimeField(blank=True, null=True)),
                        ("note", models.TextField(blank=True)),
                        ("folder_removed_at", models.DateTimeField(blank=True, null=True)),
                        ("jobs", models.ManyToManyField(blank=True, related_name="received", to="dispatch.job")),
                        ("matched_rules", models.ManyToManyField(blank=True, related_name="routed_series", to="routing.rule")),
                    ],
                    options={
                        "db_table": "dispatch_receivedseries",
                        "verbose_name": "received series",
                        "verbose_name_plural": "received series",
                        "ordering": ["-last_received_at", "-id"],
                        "indexes": [models.Index(fields=["state", "last_received_at"], name="received_due")],
                    },
                ),
            ],
            database_operations=[],
        ),
        migrations.RunPython(adopt_content_types, give_back_content_types),
    ]
