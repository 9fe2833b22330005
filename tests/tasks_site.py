"""``python -m tests.tasks_site COUNT LABEL``: record COUNT events as one batch, as a cron
job would (``km.batch()``), on the ``tasks`` backend of ``tests.tasks_settings``.

Prints one JSON line per event: person, event, and the Unix seconds around its call.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(count: int, label: str) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.tasks_settings"
    import django

    django.setup()
    from django_kissmetrics import km, publisher

    sent = []
    with km.batch():
        for i in range(count):
            before = time.time()
            km.record(f"{label} {i}", {"seq": i}, identity=f"{label}-person-{i}")
            sent.append([f"{label}-person-{i}", f"{label} {i}", int(before), int(time.time())])
    publisher.flush()
    for line in sent:
        print(json.dumps(line))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
