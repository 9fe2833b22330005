"""``{kissmetrics-settings}``: the settings table, made from the declarations in ``conf.py``.

Each field of :class:`django_kissmetrics.conf.Settings` is one row: its key, its default
(``shown`` where the value would not read well) and its documentation, in the order of
declaration. Nothing is written twice, so the table cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from django_kissmetrics.conf import Settings

HEADER = ["| Key | Default | What it changes |", "| --- | --- | --- |"]


def literal(value: Any) -> str:
    """``value`` as a user would write it in settings.py."""
    if isinstance(value, tuple):
        inner = ", ".join(literal(v) for v in value)
        return f"({inner})"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def rows() -> list[str]:
    """The table, one Markdown line per key after the header."""
    lines = list(HEADER)
    for field in dataclasses.fields(Settings):
        shown = field.metadata["shown"] or f"`{literal(field.default)}`"
        doc = " ".join(field.metadata["doc"].split()).replace("|", "\\|")
        lines.append(f"| `{field.name}` | {shown} | {doc} |")
    return lines


def setup(app: Any) -> dict[str, Any]:
    """Register the directive (Sphinx is imported here: the test suite reads :func:`rows`)."""
    from docutils import nodes
    from docutils.statemachine import StringList
    from sphinx.util.docutils import SphinxDirective

    class SettingsTable(SphinxDirective):
        """The table of every ``KISSMETRICS`` key, parsed as the page's Markdown."""

        has_content = False

        def run(self) -> list[nodes.Node]:
            container = nodes.container(classes=["kissmetrics-settings"])
            lines = StringList(rows(), source=self.get_source_info()[0])
            self.state.nested_parse(lines, self.content_offset, container)
            return [container]

    app.add_directive("kissmetrics-settings", SettingsTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
