# settings.py
from django.utils.csp import CSP

MIDDLEWARE += ["django.middleware.csp.ContentSecurityPolicyMiddleware"]
SECURE_CSP = {
    "default-src": [CSP.SELF],
    # The tag's inline script (nonce), and the two scripts of SCRIPT_URLS it loads.
    "script-src": [CSP.SELF, CSP.NONCE, "i.kissmetrics.io", "scripts.kissmetrics.io"],
    # The library sends each event as an image request to the tracking host.
    "img-src": [CSP.SELF, "trk.kissmetrics.io"],
}
