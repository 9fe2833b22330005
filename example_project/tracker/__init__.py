"""A stand-in for the Kissmetrics tracking API, so the demo needs no account.

``/tracker/e``, ``/tracker/s`` and ``/tracker/a`` answer like the real API (a 1x1 GIF)
and store each hit; ``/tracker/`` shows the hits live, grouped into people.
"""
