from django.db import migrations


class Migration(migrations.Migration):
    """`max_associations` was labelled "parallel connections" and limits HTTP and
    SFTP connections too: it is named after what it is. The column is renamed in
    place, its values kept."""

    dependencies = [
        ("targets", "0004_target_export_groups"),
    ]

    operations = [
        migrations.RenameField(
            model_name="target",
            old_name="max_associations",
            new_name="max_connections",
        ),
    ]
