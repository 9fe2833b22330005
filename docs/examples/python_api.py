"""The Python API page's examples: in a view (the current person), then outside a request."""

from datetime import datetime, timezone

from django_kissmetrics import km


def in_a_view(request):
    km.record("Purchased", {"plan": "pro", "amount": 49})  # the current person
    km.set({"plan": "pro"})  # person properties
    km.identify("ann@example.com")  # the current person is now this identity, for the session
    km.alias("old@example.com", "new@example.com")  # join two identities
    km.record("Signed Up", {"_d": 1, "_t": 1234567890})  # back-dated, as in the Kissmetrics docs


def outside_a_request(users):
    km.record("Renewed", identity="42", timestamp=datetime(2026, 1, 1, tzinfo=timezone.utc))

    with km.batch():  # outside a request: one delivery for the whole block
        for user in users:
            km.record("Subscription Renewed", identity=str(user.pk))
