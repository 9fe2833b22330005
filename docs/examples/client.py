"""``KissmetricsClient`` on its own: one synchronous HTTP call per method."""

from django_kissmetrics.client import KissmetricsClient


def send(url="https://trk.kissmetrics.io"):
    client = KissmetricsClient("KEY", url=url, timeout=5.0)
    client.record("bob@example.com", "Signed Up", {"plan": "pro"}, timestamp=1234567890)
    client.set("bob@example.com", {"plan": "pro"})
    client.alias("anonymous-id", "bob@example.com")
