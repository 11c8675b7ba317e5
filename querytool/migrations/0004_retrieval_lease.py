from django.db import migrations, models


class Migration(migrations.Migration):
    """Retrievals are claimed with the dispatch engine's claim and lease: the lease
    replaces the heartbeat. A retrieval left running by the old version has no
    lease, and counts as abandoned (taken over, or cancelled at once)."""

    dependencies = [
        ("querytool", "0003_query_permissions"),
    ]

    operations = [
        migrations.AddField(
            model_name="retrievaljob",
            name="lease_owner",
            field=models.CharField(blank=True, max_length=200),
        ),
        migrations.AddField(
            model_name="retrievaljob",
            name="lease_expires_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RemoveField(
            model_name="retrievaljob",
            name="heartbeat_at",
        ),
    ]
