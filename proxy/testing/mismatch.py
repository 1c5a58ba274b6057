"""Why a request has no recording: the closest recording and the first field that differs.

Pure functions over the requests' essential parts (``proxy.identity.essential``: what the
request key hashes), walked in sorted key order so the first difference is stable.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.identity import essential

Json = dict[str, Any]


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


MISSING: Any = _Missing()
_CONTEXT = 20  # characters shown before the point where two long texts differ


@dataclass(frozen=True, slots=True)
class Difference:
    path: str
    recorded: Any
    sent: Any

    def __str__(self) -> str:
        where = self.path or "(the request)"
        recorded, sent = self.recorded, self.sent
        if isinstance(recorded, str) and isinstance(sent, str):
            pairs = zip(recorded, sent, strict=False)
            at = next(
                (i for i, (r, t) in enumerate(pairs) if r != t), min(len(recorded), len(sent))
            )
            if at > _CONTEXT:  # show where long texts part, not their shared beginning
                start = at - _CONTEXT
                return (
                    f"{where} (from character {start}): recorded"
                    f" {_show('...' + recorded[start:])}, sent {_show('...' + sent[start:])}"
                )
        return f"{where}: recorded {_show(recorded)}, sent {_show(sent)}"


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def differences(recorded: Any, sent: Any, path: str = "") -> Iterator[Difference]:
    """Every leaf where two JSON values differ, in sorted key order, list items by index."""
    if isinstance(recorded, dict) and isinstance(sent, dict):
        for key in sorted(recorded.keys() | sent.keys()):
            yield from differences(
                recorded.get(key, MISSING), sent.get(key, MISSING), _join(path, key)
            )
    elif isinstance(recorded, list) and isinstance(sent, list):
        for index in range(max(len(recorded), len(sent))):
            yield from differences(
                recorded[index] if index < len(recorded) else MISSING,
                sent[index] if index < len(sent) else MISSING,
                _join(path, index),
            )
    elif recorded != sent or type(recorded) is not type(sent):
        yield Difference(path, recorded, sent)


@dataclass(frozen=True, slots=True)
class Closest:
    index: int
    first: Difference | None  # None: the same request (its key differs: another test's)
    count: int


def closest(recorded: Sequence[Json], sent: Json) -> Closest | None:
    """The recording with the fewest differing fields (the earliest on a tie), or None."""
    target = essential(sent)
    best: Closest | None = None
    for index, request in enumerate(recorded):
        found = list(differences(essential(request), target))
        if best is None or len(found) < best.count:
            best = Closest(index, found[0] if found else None, len(found))
    return best
