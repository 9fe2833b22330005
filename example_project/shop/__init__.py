"""The demo's shop: pages, sign-up, a purchase, and a nightly renewal command."""
