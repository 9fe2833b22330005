from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="Hit",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("path", models.CharField(max_length=2)),
                ("key", models.CharField(blank=True, max_length=255)),
                ("person", models.CharField(max_length=255)),
                ("name", models.CharField(blank=True, max_length=255)),
                ("properties", models.JSONField(default=dict)),
                ("timestamp", models.BigIntegerField(blank=True, null=True)),
                ("received", models.DateTimeField(auto_now_add=True)),
                ("user_agent", models.CharField(blank=True, max_length=300)),
            ],
            options={
                "ordering": ("id",),
            },
        ),
    ]
