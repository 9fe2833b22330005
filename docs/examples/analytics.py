# myproject/analytics.py
from django_kissmetrics.commands import Command

RELEASE = "2026.12"


def before_send(command: Command) -> Command | None:
    if command.name == "Viewed Healthcheck":
        return None
    if command.name == "Bought":
        return command._replace(name="Purchased")
    return command


def global_properties(request):
    return {"region": "eu", "release": RELEASE}
