KISSMETRICS = {
    "API_KEY": "YOUR-KEY",
    "TRACK": "django_kissmetrics.track.not_staff_or_internal",
    "INTERNAL_IPS": ["192.0.2.0/24", "2001:db8::/32"],  # the office, the VPN
}
