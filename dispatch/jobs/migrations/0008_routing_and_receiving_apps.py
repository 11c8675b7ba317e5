from django.db import migrations


class Migration(migrations.Migration):
    """Rules and received series moved to the `routing` app, the receiver's status
    to `receiving`: removed from this app's state only. Their tables stay, under
    their names (`dispatch_rule`, ...), and the new apps' first migrations take them
    over (`routing.0001_initial`, `receiving.0001_initial`)."""

    dependencies = [
        ("dispatch", "0007_job_connections"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.DeleteModel(name="ReceivedSeries"),
                migrations.DeleteModel(name="RuleCondition"),
                migrations.DeleteModel(name="Rule"),
                migrations.DeleteModel(name="ReceiverStatus"),
            ],
            database_operations=[],
        ),
    ]
