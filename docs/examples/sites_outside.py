from django_kissmetrics import km


def renew_all():
    km.record("Subscription Renewed", identity="7")


def outside_a_request():
    km.record("Renewed", identity="42", api_key="KEY-OF-THE-SHOP")
    km.set({"plan": "pro"}, identity="42", api_key="KEY-OF-THE-SHOP")
    km.alias("old@example.com", "new@example.com", api_key="KEY-OF-THE-SHOP")
    with km.batch(api_key="KEY-OF-GERMANY"):  # every call in the block that names no key
        renew_all()
