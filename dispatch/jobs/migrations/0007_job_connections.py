from django.db import migrations


class Migration(migrations.Migration):
    """A job's share of its target's parallel connections, named as the target's
    limit now is (`Target.max_connections`). The column is renamed in place."""

    dependencies = [
        ("dispatch", "0006_other_files"),
    ]

    operations = [
        migrations.RenameField(
            model_name="job",
            old_name="associations",
            new_name="connections",
        ),
    ]
