"""Hits grouped into people, the way Kissmetrics joins identities.

Every ``/a`` hit ties two identities into one person, and ties are transitive: the
anonymous id of a first visit, the user it signed up as, and the fresh anonymous id
after a log-out and log-in are all one person. A union-find over the alias hits
computes exactly that.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.utils import timezone

from .models import Hit

# What the Kissmetrics JavaScript library (and this package) makes an anonymous id:
# standard Base64 of 20 random bytes.
_ANONYMOUS = re.compile(r"[A-Za-z0-9+/]{27}=")


class UnionFind:
    """Disjoint sets of identities."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        """The representative of ``item``'s set (``item`` is added if new)."""
        parent = self.parent.setdefault(item, item)
        while parent != item:
            grandparent = self.parent[parent]
            self.parent[item] = grandparent  # Path halving keeps later finds short.
            item, parent = parent, grandparent
        return item

    def union(self, a: str, b: str) -> None:
        """Put ``a`` and ``b`` in one set."""
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[root_b] = root_a


@dataclass
class Entry:
    """One line of a person's timeline."""

    kind: str
    name: str
    identity: str
    properties: dict[str, Any]
    source: str
    at: dt.datetime

    def as_dict(self) -> dict[str, Any]:
        """A JSON-safe form."""
        return {
            "kind": self.kind,
            "name": self.name,
            "identity": self.identity,
            "properties": self.properties,
            "source": self.source,
            "at": self.at.isoformat(),
        }


@dataclass
class Person:
    """Every identity Kissmetrics would treat as one person, with all their hits.

    A person belongs to one site (one API key, ``_k``): Kissmetrics keeps each site's
    people apart, so the same identity on two sites is two people.
    """

    site: str = ""
    identities: list[str] = field(default_factory=list)
    named: list[str] = field(default_factory=list)
    aliases: list[tuple[str, str]] = field(default_factory=list)
    properties: dict[str, Any] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The first named identity, else "Anonymous visitor"."""
        return self.named[0] if self.named else "Anonymous visitor"

    @property
    def anonymous(self) -> list[str]:
        """The identities that are anonymous ids."""
        return [i for i in self.identities if i not in self.named]

    @property
    def events(self) -> list[Entry]:
        """The recorded events (``/e`` hits) only."""
        return [e for e in self.entries if e.kind == "record"]

    @property
    def last_seen(self) -> dt.datetime:
        """When the latest hit about this person happened."""
        return max(e.at for e in self.entries)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-safe form."""
        return {
            "site": self.site,
            "label": self.label,
            "identities": self.identities,
            "named": self.named,
            "anonymous": self.anonymous,
            "aliases": [list(pair) for pair in self.aliases],
            "properties": self.properties,
            "events": [e.as_dict() for e in self.events],
            "timeline": [e.as_dict() for e in self.entries],
        }


def looks_anonymous(identity: str) -> bool:
    """Whether ``identity`` has the shape of a generated anonymous id."""
    return _ANONYMOUS.fullmatch(identity) is not None


def when(hit: Hit) -> dt.datetime:
    """When the hit's command happened: its ``_t`` if it has one, else its arrival."""
    if hit.timestamp is not None:
        return dt.datetime.fromtimestamp(hit.timestamp, tz=dt.timezone.utc)
    return hit.received


def group(hits: Iterable[Hit]) -> list[Person]:
    """``hits`` as people, site by site (``_k``), the most recently active first."""
    by_site: dict[str, list[Hit]] = {}
    for hit in hits:
        by_site.setdefault(hit.key, []).append(hit)
    people = [person for site, some in by_site.items() for person in _group(site, some)]
    return sorted(people, key=lambda p: p.last_seen, reverse=True)


def _group(site: str, hits: list[Hit]) -> list[Person]:
    """The people of one site."""
    sets = UnionFind()
    alias_targets: set[str] = set()
    for hit in hits:
        sets.find(hit.person)
        if hit.path == "/a" and hit.name:
            sets.union(hit.person, hit.name)
            # This package (and the JavaScript library) aliases anonymous -> named.
            alias_targets.add(hit.name)

    people: dict[str, Person] = {}
    # Whole seconds first (``_t`` has no more), then arrival: within one second that puts
    # an alias before the events of the same request, as the package delivers them.
    for hit in sorted(hits, key=lambda h: (int(when(h).timestamp()), h.pk or 0)):
        person = people.setdefault(sets.find(hit.person), Person(site=site))
        identities = [hit.person, hit.name] if hit.path == "/a" else [hit.person]
        for identity in identities:
            if identity and identity not in person.identities:
                person.identities.append(identity)
                if identity in alias_targets or not looks_anonymous(identity):
                    person.named.append(identity)
        if hit.path == "/a":
            person.aliases.append((hit.person, hit.name))
        elif hit.path == "/s":
            person.properties.update(hit.properties)
        person.entries.append(
            Entry(
                kind=hit.kind,
                name=hit.name,
                identity=hit.person,
                properties=dict(hit.properties),
                source=hit.source,
                at=timezone.localtime(when(hit)),
            )
        )
    return list(people.values())
