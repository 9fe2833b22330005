KISSMETRICS = {
    "API_KEY": "KEY-OF-THE-MAIN-SITE",  # hosts in no entry; None: they are not tracked
    "SITES": {
        "shop.example.com": "KEY-OF-THE-SHOP",
        ".example.de": "KEY-OF-GERMANY",  # example.de and every subdomain of it
        "staging.example.com": None,  # not tracked at all
    },
}
