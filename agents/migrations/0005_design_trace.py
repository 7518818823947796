from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0004_design_leases"),
    ]

    operations = [
        migrations.AddField(
            model_name="design",
            name="trace_parent",
            field=models.CharField(blank=True, max_length=55),
        ),
    ]
