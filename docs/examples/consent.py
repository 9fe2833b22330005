# myproject/consent.py; KISSMETRICS = {..., "CONSENT": "myproject.consent.analytics_agreed"}
def analytics_agreed(request):
    return request.COOKIES.get("analytics_consent") == "yes"
