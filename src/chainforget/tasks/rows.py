"""Checks of one data row's fields against its release format, one call per field.

:func:`field` returns the value at a dotted path (``question.choices.0.text``) when it has the expected kind, else
raises one :class:`DataError` line naming file, row, field, the value found (shortened) and what the release has
there. Loaders call it before converting, so a list given as a string is refused instead of being iterated
character by character, and a number where text belongs is refused instead of being turned into a string.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from chainforget.errors import DataError

SHOWN = 60  # characters of a bad value quoted in the message


@dataclass(frozen=True)
class Kind:
    """What a field holds: ``expected`` words it in the error, ``accepts`` tests one value."""

    expected: str
    accepts: Callable[[object], bool]


def _text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


TEXT = Kind("non-empty text", _text)
STRING = Kind("text", lambda value: isinstance(value, str))
# ids and indices are strings in some releases and integers in others; a bool is JSON true/false, not an id
KEY = Kind("non-empty text or an integer", lambda v: _text(v) or (isinstance(v, int) and not isinstance(v, bool)))
OBJECT = Kind("an object", lambda value: isinstance(value, dict))


def list_of(item: Kind, low: int = 0, high: int | None = None, expected: str | None = None) -> Kind:
    """A JSON list (never a string) of ``low`` to ``high`` items of kind ``item``."""
    if high is None:
        count = f"at least {low} " if low else ""
    else:
        count = f"{low} " if high == low else f"{low} to {high} "

    def accepts(value) -> bool:
        if not isinstance(value, list) or len(value) < low or (high is not None and len(value) > high):
            return False
        return all(item.accepts(x) for x in value)

    return Kind(expected or f"a list of {count}items, each {item.expected}", accepts)


_MISSING = object()


def field(row: dict, path: str, kind: Kind, where: str, line: int, default=_MISSING):
    """``row``'s value at ``path`` (keys and list indices joined by dots) if it is of ``kind``.

    With a ``default``, a missing or null field (or a null parent) gives the default instead of an error.
    """
    value = row
    parts = path.split(".")
    for depth, part in enumerate(parts):
        if value is None and default is not _MISSING:
            return default
        if isinstance(value, dict):
            value = value.get(part, _MISSING)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:  # the parent is not an object: name the parent, not the field inside it
            raise bad(where, line, ".".join(parts[:depth]) or "row", value, f"an object with field {part!r}")
        if value is _MISSING:
            if default is not _MISSING:
                return default
            raise DataError(f"{where}:{line}: field {path}: missing; expected {kind.expected}")
    if value is None and default is not _MISSING:
        return default
    if not kind.accepts(value):
        raise bad(where, line, path, value, kind.expected)
    return value


def bad(where: str, line: int, path: str, value, expected: str) -> DataError:
    """The one-line error for a field whose value is not what the release format has there."""
    shown = repr(value)
    if len(shown) > SHOWN:
        shown = shown[: SHOWN - 3] + "..."
    if isinstance(value, list):
        shown += f" ({len(value)} item{'' if len(value) == 1 else 's'})"
    return DataError(f"{where}:{line}: field {path}: {shown}; expected {expected}")
