import django.utils.timezone
from django.db import migrations, models


def adopt_content_type(apps, schema_editor):
    """Move the model's content type over, so that the permissions granted on it
    (and the admin's history) stay with it."""
    content_type = apps.get_model("contenttypes", "ContentType")
    db = schema_editor.connection.alias
    if not content_type.objects.using(db).filter(
        app_label="receiving", model="receiverstatus"
    ).exists():
        content_type.objects.using(db).filter(
            app_label="dispatch", model="receiverstatus"
        ).update(app_label="receiving")


def give_back_content_type(apps, schema_editor):
    content_type = apps.get_model("contenttypes", "ContentType")
    db = schema_editor.connection.alias
    content_type.objects.using(db).filter(
        app_label="receiving", model="receiverstatus"
    ).update(app_label="dispatch")


class Migration(migrations.Migration):
    """Take over the receiver's status from the `dispatch` app: state only, the
    table (created by `dispatch.0003_routing`) keeps its name and rows."""

    initial = True

    dependencies = [
        ("contenttypes", "0002_remove_content_type_name"),
        ("dispatch", "0008_routing_and_receiving_apps"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="ReceiverStatus",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                        ("name", models.CharField(max_length=64, unique=True)),
                        ("started_at", models.DateTimeField(default=django.utils.timezone.now)),
                        ("heartbeat_at", models.DateTimeField(default=django.utils.timezone.now)),
                        ("info", models.JSONField(blank=True, default=dict)),
                        ("refused_count", models.PositiveIntegerField(default=0)),
                        ("last_refusal", models.TextField(blank=True)),
                        ("last_refusal_at", models.DateTimeField(blank=True, null=True)),
                    ],
                    options={
                        "db_table": "dispatch_receiverstatus",
                        "verbose_name_plural": "receiver status",
                    },
                ),
            ],
            database_operations=[],
        ),
        migrations.RunPython(adopt_content_type, give_back_content_type),
    ]
