# settings.py
KISSMETRICS = {
    "API_KEY": "YOUR-KEY",
    "BEFORE_SEND": "myproject.analytics.before_send",
    "GLOBAL_PROPERTIES": "myproject.analytics.global_properties",
}
