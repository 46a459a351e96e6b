"""The text of an aggregate id, as the views store it.

``str(UUID)`` formats 128 bits on every call, and a replay asks for the same few thousand ids
(a job's, its buyer's, its offer's) hundreds of thousands of times; this remembers them.
"""

from __future__ import annotations

from uuid import UUID

MAX_REMEMBERED = 65_536
_texts: dict[int, str] = {}


def id_text(value: UUID) -> str:
    key = value.int
    text = _texts.get(key)
    if text is None:
        if len(_texts) >= MAX_REMEMBERED:
            _texts.clear()
        text = _texts[key] = str(value)
    return text
