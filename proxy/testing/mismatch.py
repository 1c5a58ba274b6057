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


@dataclass(frozen=True, slots=True)
class Difference:
    path: str
    recorded: Any
    sent: Any

    def __str__(self) -> str:
        where = self.path or "(the request)"
        return f"{where}: recorded {_show(self.recorded)}, sent {_show(self.sent)}"


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
    first: Difference
    count: int


def closest(recorded: Sequence[Json], sent: Json) -> Closest | None:
    """The recording with the fewest differing fields (the earliest on a tie), or None."""
    target = essential(sent)
    best: Closest | None = None
    for index, request in enumerate(recorded):
        found = list(differences(essential(request), target))
        if not found:
            continue  # the same request: its recordings were used up elsewhere
        if best is None or len(found) < best.count:
            best = Closest(index, found[0], len(found))
    return best
