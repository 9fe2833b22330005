def test_pricing_page_records_a_view(client, km_outbox):
    client.get("/pricing/")
    (command,) = km_outbox
    assert command.kind == "record"
    assert command.name == "Viewed Pricing"
    assert command.properties == {"plan": "pro"}
