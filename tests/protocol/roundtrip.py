"""The one round-trip check every format table feeds (STYLE 8)."""

from __future__ import annotations

from typing import Any

import pytest
from construct import SizeofError

VARIABLE = None
"""``size`` of a format with no static size (sizeof raises SizeofError)."""


def assert_round_trip(fmt: Any, raw: bytes, obj: Any, *, size: int | str | None = "len") -> None:
    """``raw`` parses to ``obj``, ``obj`` builds to ``raw``, and sizeof() is ``size``
    (by default ``len(raw)``; VARIABLE for formats without a static size)."""
    assert fmt.parse(raw) == obj
    assert fmt.build(obj) == raw
    if size is VARIABLE:
        with pytest.raises(SizeofError):
            fmt.sizeof()
    else:
        assert fmt.sizeof() == (len(raw) if size == "len" else size)
