KISSMETRICS = {
    "API_KEY": "YOUR-KEY",
    "AUTO_EVENTS": ["Visited Site", "Ad Campaign Hit", "Search Engine Hit", "Referrer"],
}
