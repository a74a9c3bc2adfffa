"""The unit every prep step consumes and yields."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    """One raw document.

    Attributes:
        id: stable identifier, ``<relative file>:<line>``.
        text: the document body.
        source: the domain it belongs to (e.g. ``RedPajamaGithub``).
        meta: the rest of the input record's metadata, untouched.
    """

    id: str
    text: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """UTF-8 size of ``text``. Every step counts it in and out, so it must be cheap:
        ``str.isascii`` is O(1) in CPython (a flag of the string object), and a non-ASCII size is
        kept until ``text`` is replaced."""
        text = self.text
        if text.isascii():
            return len(text)
        cached = self.__dict__.get("_nbytes")
        if cached is None or cached[0] is not text:
            cached = (text, len(text.encode("utf-8")))
            self.__dict__["_nbytes"] = cached
        return cached[1]
