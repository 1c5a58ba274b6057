"""Masking secrets (API keys, tokens, private keys, e-mail addresses) in what the proxy stores.

Only the stored copies (the request JSON and the stored chat.completion JSON) are masked;
what is forwarded upstream or returned to the client is never touched. A match becomes
``[REDACTED:<rule name>]``.

Rules run one after another over each string, in a fixed order: the builtin patterns in the
order of ``BUILTIN`` (specific before generic, so ``sk-ant-...`` is masked as an Anthropic
key, not an OpenAI one, and the token after ``Bearer`` is masked once), then the custom ones.
A marker never matches a later builtin rule, so nothing is wrapped twice.

The builtin patterns are written to stay linear on hostile input and fast on long text: most
start with a literal prefix (so ``re`` skips ahead to candidates), no quantifier is nested
inside another unbounded one, and the ones that can fail after a long scan (JWT, e-mail) only
try where a run of their characters begins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def _starts(width: int, word: str = r"\w") -> str:
    r"""Placed right after a token's first ``width`` characters: the token starts a word.

    That is, the character before the token is not a ``word`` character, or the token follows
    a JSON escape such as ``\n``: JSON inside a string (tool-call arguments, a file a tool
    writes) decoded one level keeps a literal backslash-n before a key on a new line, and its
    ``n`` would defeat a plain ``\b``. Checked after the prefix rather than before it so the
    pattern starts with a literal, which lets ``re`` skip ahead to candidates instead of
    trying every position.
    """
    return rf"(?:(?<!{word}.{{{width}}})|(?<=\\[nrtbf].{{{width}}}))"


# base64url characters, as JWT segments use them.
_B64URL = r"[A-Za-z0-9_-]"

BUILTIN: dict[str, str] = {
    # PEM private keys (RSA, EC, DSA, OPENSSH, ENCRYPTED, PKCS#8, PGP armour): the header,
    # everything up to the next "-----", and the END line when that is what follows. A key
    # cut short (no END line) is masked to the end of the string: over-masking a log beats
    # storing half a key. The body stops at the first "-----", so each header scans its own
    # stretch of text only.
    "private_key": (
        r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"
        r"(?:[^-]|-(?!----))*+"
        r"(?:-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----)?"
    ),
    # Anthropic: sk-ant-api03-..., sk-ant-admin01-..., sk-ant-oat01-... Before openai_key.
    "anthropic_key": r"sk-ant-" + _starts(7) + r"[A-Za-z0-9_-]{20,}",
    # OpenAI: legacy sk-<48>, sk-proj-..., sk-svcacct-..., sk-admin-... (all within the
    # class). The lookahead keeps it off Anthropic keys whatever the rule order.
    "openai_key": r"sk-" + _starts(3) + r"(?!ant-)[A-Za-z0-9_-]{20,}",
    # Stripe secret (sk_) and restricted (rk_) keys, live and test (test keys are credentials
    # too). Publishable pk_ keys are public by design.
    "stripe_key": r"[sr]k_" + _starts(3) + r"(?:live|test)_[A-Za-z0-9]{16,}",
    # GitHub classic tokens (36 characters today; GitHub says they may grow) and
    # fine-grained personal access tokens (github_pat_<22>_<59>).
    "github_token": (
        r"(?:gh[pousr]_" + _starts(4) + r"[A-Za-z0-9]{36,}"
        r"|github_pat_" + _starts(11) + r"[A-Za-z0-9_]{22,})"
    ),
    # Slack bot, user, app-level, refresh and legacy tokens: xoxb-123-456-abc...
    "slack_token": r"xox[abprs]-" + _starts(5) + r"[A-Za-z0-9-]{10,}",
    # AWS access key ids, long-term (AKIA) and temporary (ASIA). The 40-character secret
    # access key has no prefix and cannot be told from other base64 reliably.
    "aws_access_key_id": r"A[KS]IA" + _starts(4) + r"[A-Z0-9]{16}\b",
    # Google API keys: AIza + 35. The class ends in "-", where \b would not hold.
    "google_api_key": r"AIza" + _starts(4) + r"[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])",
    # This proxy's own keys (proxy.callers.new_key): cpk_<12 hex>_<token_urlsafe(32)>.
    "proxy_key": r"cpk_" + _starts(4) + r"[0-9a-f]{12}_[A-Za-z0-9_-]{20,}",
    # JSON Web Tokens: header and payload are base64url JSON objects (eyJ = '{"'), the
    # signature may be empty (alg none). Tried only where a base64url run starts, so a long
    # run that is not a JWT is scanned once, not once per "eyJ" in it.
    "jwt": (r"eyJ" + _starts(3, _B64URL) + rf"{_B64URL}+\.eyJ{_B64URL}+\.{_B64URL}*"),
    # The credential after "Bearer" in free text (an Authorization header pasted into a
    # prompt); only the ``secret`` group is masked. RFC 6750 token characters, 16 or more so
    # "Bearer authentication" stays prose. After the key and JWT rules: a token they masked
    # starts with "[" and is left alone.
    "bearer_token": (
        r"(?:Bearer|bearer|BEARER)" + _starts(6) + r"\s++(?P<secret>[A-Za-z0-9._~+/-]{16,}=*)"
    ),
    # E-mail addresses with a dotted domain. Bounded parts (RFC 5321 limits) and a start only
    # where a run of local-part characters begins keep this linear; a backslash before the
    # start is excluded so "\nuser@..." does not swallow the n of the escape. \w, not ASCII,
    # so internationalised addresses (josé@exämple.de) are masked whole, not skipped.
    "email": (
        r"[\w.%+-]" + _starts(1, r"[\w.%+\\-]") + r"[\w.%+-]{0,63}"
        r"@[\w-]{1,63}(?:\.[\w-]{1,63}){0,8}\.[^\W\d_]{2,24}\b"
    ),
}

DEFAULT_BUILTIN: tuple[str, ...] = tuple(BUILTIN)

# Literal text every match of a builtin rule contains. A string with none of a rule's hints
# cannot match it, and a substring test is far cheaper than the regex (several patterns must
# try at every position): most stored text holds no secret, and this keeps it nearly free.
HINTS: dict[str, tuple[str, ...]] = {
    "private_key": ("-----BEGIN",),
    "anthropic_key": ("sk-ant-",),
    "openai_key": ("sk-",),
    "stripe_key": ("k_live_", "k_test_"),
    "github_token": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    "slack_token": ("xox",),
    "aws_access_key_id": ("AKIA", "ASIA"),
    "google_api_key": ("AIza",),
    "proxy_key": ("cpk_",),
    "jwt": ("eyJ",),
    "bearer_token": ("Bearer", "bearer", "BEARER"),
    "email": ("@",),
}

# Bytes that are rare in prose and in the JSON around it, best first: a hint holding one is
# found by a scan that stops only where that byte is.
_ANCHORS = b"@J_-"


class HintGates:
    """Finds exactly the documents holding one of ``hints`` (see ``passes``).

    One alternation of all the hints starts at any of a dozen common letters, and ``re``
    tries every branch at each of them. Here each hint is anchored on one byte (its rarest
    by ``_ANCHORS``, else its first), the bytes before the anchor checked looking back
    from it, and the hints sharing an anchor make one pattern. ``re`` skips ahead to a
    pattern's leading literal byte in a tight loop and tries the rest only there, so a
    document read once per anchor is still read several times faster than by the
    alternation; and a document without an anchor's byte at all, which ``bytes.find``
    tells faster still, is not read by its pattern.
    """

    __slots__ = ("_gates",)

    def __init__(self, hints: Iterable[bytes]) -> None:
        groups: dict[bytes, list[bytes]] = {}
        for hint in sorted(set(hints)):
            at = min(range(len(hint)), key=lambda i: (_ANCHORS.find(hint[i]) % 256, i))
            before = re.escape(hint[: at + 1])
            lookbehind = b"(?<=" + before + b")" if at else b""
            tail = lookbehind + re.escape(hint[at + 1 :])
            groups.setdefault(hint[at : at + 1], []).append(tail)
        self._gates = tuple(
            (
                anchor,
                re.compile(
                    re.escape(anchor) + (b"" if b"" in tails else b"(?:" + b"|".join(tails) + b")")
                ),
            )
            for anchor, tails in groups.items()
        )

    def passes(self, document: bytes) -> bool:
        """Whether ``document`` holds one of the hints."""
        for anchor, gate in self._gates:
            at = document.find(anchor)
            if at >= 0 and gate.search(document, at) is not None:
                return True
        return False


# Custom rule names end up inside stored text; keep them plain.
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class Rule:
    """A named pattern. Its matches become ``[REDACTED:<name>]``; when the pattern has a group
    named ``secret``, only that group is masked (``password=(?P<secret>\\S+)`` keeps the
    ``password=``)."""

    name: str
    pattern: re.Pattern[str]
    hints: tuple[str, ...] = ()  # literal text every match contains; empty: always try

    def may_match(self, value: str) -> bool:
        return not self.hints or any(hint in value for hint in self.hints)


def _compile(name: str, source: str, hints: tuple[str, ...] = ()) -> Rule:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"redaction rule name {name!r} is not valid: use 1 to 64 letters, digits, '_', '.'"
            " or '-'"
        )
    try:
        pattern = re.compile(source)
    except re.error as exc:
        raise ValueError(f"redaction pattern {name!r} does not compile: {exc}") from exc
    # One that matches the empty string would match (and be masked) everywhere; refuse it early.
    if pattern.search("") is not None:
        raise ValueError(f"redaction pattern {name!r} matches the empty string")
    return Rule(name, pattern, hints)


class Redactor:
    """Masks the matches of its rules in strings and in the string values of JSON."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self._rules = tuple(rules)
        self._unhinted = any(not rule.hints for rule in self._rules)
        # Each rule with its hints as bytes, to test a document's JSON before decoding it,
        # and the gates every hint passes, for the first pass, which most documents end.
        self._byte_hints = tuple(
            (rule, tuple(hint.encode() for hint in rule.hints)) for rule in self._rules
        )
        self._gates = HintGates({hint for _, hints in self._byte_hints for hint in hints})

    @classmethod
    def build(cls, builtin: Sequence[str], custom: Mapping[str, str]) -> Redactor:
        """builtin: names from BUILTIN; custom: name -> regex source.

        Builtin rules run in the order of BUILTIN whatever order they are named in (the order
        is what lets a specific pattern win), then the custom ones in their given order.
        Raises ValueError with a readable message for an unknown builtin name, a regex that
        does not compile or matches the empty string, a bad name, or a name used twice.
        """
        unknown = [name for name in builtin if name not in BUILTIN]
        if unknown:
            raise ValueError(
                f"unknown builtin redaction pattern(s): {', '.join(map(repr, unknown))};"
                f" known: {', '.join(BUILTIN)}"
            )
        wanted = set(builtin)
        clashes = [name for name in custom if name in wanted]
        if clashes:
            raise ValueError(
                f"custom redaction pattern(s) {', '.join(map(repr, clashes))} have the name of"
                " an enabled builtin pattern; rename them or disable the builtin"
            )
        rules = [
            _compile(name, source, HINTS[name])
            for name, source in BUILTIN.items()
            if name in wanted
        ]
        rules += [_compile(name, source) for name, source in custom.items()]
        return cls(rules)

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules

    @property
    def enabled(self) -> bool:
        """False when there are no rules: callers may skip redaction altogether."""
        return bool(self._rules)

    def text(self, value: str, rules: Sequence[Rule] | None = None) -> tuple[str, int]:
        """The masked text and the number of replacements (by ``rules``, else all of them)."""
        total = 0
        for rule in self._rules if rules is None else rules:
            if rule.may_match(value) and rule.pattern.search(value) is not None:
                value, count = _apply(rule, value)
                total += count
        return value, total

    def document(self, encoded: bytes, value: Any) -> tuple[Any, int]:
        """Like ``json``, for a document also at hand as its JSON bytes, which say which rules
        can match at all (one scan for all hints): none, and the walk is skipped;
        some, and only those walk it.

        The bytes are what orjson or the client wrote. A hint's characters can hide in them
        only as ``\\u`` escapes, so when the bytes hold one, every rule walks a document that
        has any hint. A document with no hint at all is still skipped: a client that spells a
        secret's prefix in ``\\u`` escapes, with no other hint around, defeats this shortcut,
        which is for secrets pasted by accident.
        """
        if not self._rules:
            return value, 0
        if self._unhinted:
            return self.json(value)
        if not self._gates.passes(encoded):
            return value, 0
        if b"\\u" in encoded:
            return self.json(value)
        present = [rule for rule, hints in self._byte_hints if any(h in encoded for h in hints)]
        return self.json(value, present)

    def json(self, value: Any, rules: Sequence[Rule] | None = None) -> tuple[Any, int]:
        """A copy of parsed JSON with every string value masked (by ``rules``, else all of
        them), and the replacement count.

        Dict keys, numbers, booleans and null are kept as they are; dicts and lists are new
        objects, so the input is never mutated. Iterative rather than recursive: a request
        nested as deep as the JSON parser allows must not hit Python's recursion limit.
        """
        if isinstance(value, str):
            return self.text(value, rules)
        if not isinstance(value, dict | list):
            return value, 0
        total = 0
        root: dict[str, Any] | list[Any] = {} if isinstance(value, dict) else []
        # Pairs (source container, its copy still to be filled).
        stack: list[tuple[Any, Any]] = [(value, root)]
        while stack:
            source, copy = stack.pop()
            items = source.items() if isinstance(source, dict) else enumerate(source)
            for key, item in items:
                out = item
                if isinstance(item, str):
                    out, count = self.text(item, rules)
                    total += count
                elif isinstance(item, dict | list):
                    out = {} if isinstance(item, dict) else []
                    stack.append((item, out))
                if isinstance(copy, dict):
                    copy[key] = out
                else:
                    copy.append(out)
        return root, total


def _apply(rule: Rule, value: str) -> tuple[str, int]:
    """``value`` with the matches of ``rule`` masked, and how many there were.

    A function replacement rather than a template string: the marker is inserted literally,
    and a zero-width match (possible with a custom pattern such as ``a|\\b``) is left alone
    and not counted instead of putting a marker between two characters.
    """
    marker = f"[REDACTED:{rule.name}]"
    count = 0

    secret = "secret" in rule.pattern.groupindex

    def replace(match: re.Match[str]) -> str:
        nonlocal count
        start, end = match.span("secret") if secret else match.span()
        if start == end:  # zero-width, or the secret group took no part in the match
            return match[0]
        count += 1
        offset = match.start()
        return f"{match[0][: start - offset]}{marker}{match[0][end - offset :]}"

    return rule.pattern.sub(replace, value), count
