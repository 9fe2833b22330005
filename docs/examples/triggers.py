from django.shortcuts import redirect

from django_kissmetrics import km


def product(request):
    km.js.track_click("#buy", "Clicked Buy", {"plan": "pro"})
    km.js.track_submit("#signup", "Submitted Signup")
    km.js.track_click_on_outbound_link(".partner", "Left For Partner")
    return redirect("receipt")
