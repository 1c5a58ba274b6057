"""Unit tests for proxy.redaction: the builtin patterns, custom rules, and the JSON walk."""

from __future__ import annotations

import base64
import copy
import json
import random
import re
import string
from typing import Any

import orjson
import pytest

from proxy.redaction import BUILTIN, DEFAULT_BUILTIN, HINTS, HintGates, Redactor, Rule

ALNUM = string.ascii_letters + string.digits
B64URL = ALNUM + "-_"


def fake(length: int, alphabet: str = ALNUM, seed: int = 0) -> str:
    """A deterministic random-looking string: test secrets are built, never written out, so
    no secret scanner mistakes this file for a leak."""
    rnd = random.Random(f"{seed}-{length}-{alphabet}")
    return "".join(rnd.choice(alphabet) for _ in range(length))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(signature: bool = True) -> str:
    header = b64url(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    payload = b64url(orjson.dumps({"sub": "1234567890", "name": "Jane", "iat": 1516239022}))
    return f"{header}.{payload}.{fake(43, B64URL) if signature else ''}"


def pem(kind: str, headers: str = "") -> str:
    body = "\n".join(fake(64, ALNUM + "+/", seed=i) for i in range(5)) + "\n" + fake(20) + "=="
    return f"-----BEGIN {kind}-----\n{headers}{body}\n-----END {kind}-----"


OPENAI_LEGACY = "sk-" + fake(48)
OPENAI_PROJECT = "sk-proj-" + fake(156, B64URL)
OPENAI_SERVICE = "sk-svcacct-" + fake(120, B64URL)
ANTHROPIC = "sk-ant-api03-" + fake(93, B64URL) + "AA"
AWS = "AKIA" + fake(16, string.ascii_uppercase + string.digits)
JWT = make_jwt()

FULL = Redactor.build(DEFAULT_BUILTIN, {})


def marker(name: str) -> str:
    return f"[REDACTED:{name}]"


# -- the builtin patterns ------------------------------------------------------------------------

# (rule, secret, text around it with {} where the secret goes)
EXAMPLES: list[tuple[str, str, str]] = [
    ("openai_key", OPENAI_LEGACY, "my key is {} please use it"),
    ("openai_key", OPENAI_PROJECT, "OPENAI_API_KEY={}\n"),
    ("openai_key", OPENAI_SERVICE, 'client = OpenAI(api_key="{}")'),
    ("openai_key", "sk-admin-" + fake(60, B64URL), "admin key: {}."),
    ("anthropic_key", ANTHROPIC, "export ANTHROPIC_API_KEY='{}'"),
    ("anthropic_key", "sk-ant-admin01-" + fake(80, B64URL), "{}"),
    ("aws_access_key_id", AWS, "aws_access_key_id = {}\naws_secret_access_key = ..."),
    ("aws_access_key_id", "ASIA" + fake(16, string.ascii_uppercase + string.digits), "id {},"),
    ("github_token", "ghp_" + fake(36), "git clone https://{}@github.com/o/r.git"),
    ("github_token", "gho_" + fake(36), "token: {}"),
    ("github_token", "ghu_" + fake(36), "token: {}"),
    ("github_token", "ghs_" + fake(36), "token: {}"),
    ("github_token", "ghr_" + fake(36), "token: {}"),
    ("github_token", "github_pat_" + fake(22) + "_" + fake(59), "GH_TOKEN={} gh pr list"),
    ("slack_token", "xoxb-123456789012-1234567890123-" + fake(24), "SLACK_BOT_TOKEN={}"),
    ("slack_token", "xoxp-12345-67890-" + fake(32), "use {} for the user"),
    ("google_api_key", "AIza" + fake(35, B64URL), "https://maps.googleapis.com/x?key={}&q=1"),
    ("stripe_key", "sk_live_" + fake(24), "stripe.api_key = '{}'"),
    ("stripe_key", "rk_live_" + fake(99), "restricted: {}"),
    ("stripe_key", "sk_test_" + fake(24), "test mode: {}"),
    ("proxy_key", "cpk_" + fake(12, "0123456789abcdef") + "_" + fake(43, B64URL), "key {} ok"),
    ("jwt", JWT, "the session cookie was {}; it expired"),
    ("jwt", make_jwt(signature=False), "unsigned: {} (alg none)"),
    ("bearer_token", fake(40, B64URL + ".~+/"), "curl -H 'Authorization: Bearer {}' https://x"),
    ("bearer_token", fake(32) + "==", "authorization: bearer {}"),
    ("private_key", pem("RSA PRIVATE KEY"), "here is my key:\n{}\nthanks"),
    ("private_key", pem("PRIVATE KEY"), "{}"),
    ("private_key", pem("OPENSSH PRIVATE KEY"), "~/.ssh/id_ed25519:\n{}\n"),
    ("private_key", pem("EC PRIVATE KEY"), "{}"),
    (
        "private_key",
        pem("RSA PRIVATE KEY", "Proc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,AB12CD\n\n"),
        "encrypted: {} (passphrase elsewhere)",
    ),
    ("private_key", pem("PGP PRIVATE KEY BLOCK", "Version: GnuPG v1.4.11 (GNU/Linux)\n\n"), "{}"),
    ("email", "jane.doe@example.com", "write to {} today"),
    ("email", "first.last+tag@mail.example.co.uk", "<{}>"),
    ("email", "ops_team-1@sub.example.io", "mailto:{}"),
    ("email", "josé.müller@exämple.de", "from {} with love"),
]


def test_defaults_are_every_builtin() -> None:
    assert tuple(BUILTIN) == DEFAULT_BUILTIN
    assert [rule.name for rule in FULL.rules] == list(BUILTIN)


def test_every_builtin_has_an_example() -> None:
    assert {name for name, _, _ in EXAMPLES} == set(BUILTIN)


@pytest.mark.parametrize(
    ("name", "secret", "around"), EXAMPLES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(EXAMPLES)]
)
def test_builtin_masks_example(name: str, secret: str, around: str) -> None:
    text = around.format(secret)
    masked, count = FULL.text(text)
    assert masked == around.format(marker(name))
    assert count == 1


@pytest.mark.parametrize(("name", "secret", "around"), EXAMPLES)
def test_builtin_rule_alone_masks_example(name: str, secret: str, around: str) -> None:
    """Each rule catches its examples by itself, not thanks to another rule."""
    masked, count = Redactor.build([name], {}).text(around.format(secret))
    assert secret not in masked
    assert count == 1


NEAR_MISSES = [
    "sk-",
    "sk- is how OpenAI keys start",
    "skeleton key",
    "sk-short",
    "risk-assessment-for-the-whole-project",
    "task-management-system-overview-document",
    "sk-ant-",
    "AKIA",
    "AKIA" + "A" * 15,
    "AKIA" + "A" * 16 + "lowercase-tail",
    "BAKIA" + "A" * 16,
    "ghp_" + fake(35),
    "ghp_token",
    "github_pat_short",
    "xoxb-",
    "xoxb-1234",
    "AIza" + fake(34),
    "AIza" + fake(36),
    "sk_live_short",
    "pk_live_" + fake(24),
    "cpk_nothex00000_" + fake(43),
    "eyJhbGciOiJIUzI1NiJ9",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0",
    "header.payload.signature",
    "Bearer authentication",
    "Bearer tokens are sent in the Authorization header",
    "Authorization: Bearer <token>",
    "Authorization: Bearer $TOKEN",
    "user@localhost",
    "@handle mentioned you",
    "john@doe",
    "first.last is a name",
    "email me at jane dot doe at example dot com",
    "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n"
    "-----END PUBLIC KEY-----",
    "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkqhkiG9w0BAQUFADBa\n"
    "-----END CERTIFICATE-----",
    "x = 1 + 2; print('hello, world')",
]


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_are_left_alone(text: str) -> None:
    assert FULL.text(text) == (text, 0)


def test_anthropic_key_is_not_an_openai_key() -> None:
    assert FULL.text(ANTHROPIC) == (marker("anthropic_key"), 1)
    # The OpenAI rule keeps off it by itself, whatever the order.
    assert Redactor.build(["openai_key"], {}).text(ANTHROPIC) == (ANTHROPIC, 0)


def test_builtin_order_is_fixed_whatever_order_they_are_named_in() -> None:
    forward = Redactor.build(["anthropic_key", "openai_key", "jwt", "bearer_token"], {})
    backward = Redactor.build(["bearer_token", "jwt", "openai_key", "anthropic_key"], {})
    assert [r.name for r in forward.rules] == [r.name for r in backward.rules]
    text = f"{ANTHROPIC} {OPENAI_LEGACY} Bearer {JWT}"
    assert forward.text(text) == backward.text(text)


@pytest.mark.parametrize(
    ("token", "name"),
    [(JWT, "jwt"), (OPENAI_PROJECT, "openai_key"), (ANTHROPIC, "anthropic_key")],
)
def test_bearer_token_is_masked_once(token: str, name: str) -> None:
    text = f"Authorization: Bearer {token}"
    assert FULL.text(text) == (f"Authorization: Bearer {marker(name)}", 1)


def test_bearer_keeps_the_scheme_and_spacing() -> None:
    token = fake(30)
    assert FULL.text(f"BEARER   {token}") == (f"BEARER   {marker('bearer_token')}", 1)


def test_several_secrets_in_one_text_are_all_counted() -> None:
    text = f"{OPENAI_LEGACY}, {AWS} and {OPENAI_LEGACY} to jane@example.com"
    masked, count = FULL.text(text)
    assert count == 4
    assert masked == (
        f"{marker('openai_key')}, {marker('aws_access_key_id')} and {marker('openai_key')}"
        f" to {marker('email')}"
    )


def test_markers_are_stable_under_a_second_pass() -> None:
    """Masking what was masked already changes nothing: no rule matches a marker."""
    text = " ".join(around.format(secret) for _, secret, around in EXAMPLES)
    once, count = FULL.text(text)
    assert count == len(EXAMPLES)
    assert FULL.text(once) == (once, 0)


def test_private_key_without_end_line_is_masked_to_the_end() -> None:
    """A key cut short (a truncated paste, max_tokens) must not be stored half-masked."""
    truncated = pem("RSA PRIVATE KEY").split("-----END")[0]
    assert FULL.text("key:\n" + truncated) == ("key:\n" + marker("private_key"), 1)


def test_private_key_block_stops_at_its_end_line() -> None:
    text = f"{pem('PRIVATE KEY')}\n-----BEGIN CERTIFICATE-----\nMIID\n-----END CERTIFICATE-----"
    masked, count = FULL.text(text)
    assert count == 1
    assert masked.startswith(marker("private_key") + "\n-----BEGIN CERTIFICATE-----")


# -- JSON inside a string ------------------------------------------------------------------------


def test_json_inside_a_string_is_masked_and_stays_json() -> None:
    key = pem("OPENSSH PRIVATE KEY")
    arguments = orjson.dumps(
        {
            "api_key": OPENAI_PROJECT,
            "env": f"HOME=/root\n{ANTHROPIC}\n{AWS}",
            "owner": "ops\njane@example.com",
            "ssh_key": key,
        }
    ).decode()
    # Decoded one level, the inner string holds literal backslash-n escapes before the keys.
    assert "\\n" + ANTHROPIC in arguments

    masked, count = FULL.text(arguments)

    assert count == 5
    assert orjson.loads(masked) == {
        "api_key": marker("openai_key"),
        "env": f"HOME=/root\n{marker('anthropic_key')}\n{marker('aws_access_key_id')}",
        "owner": f"ops\n{marker('email')}",
        "ssh_key": marker("private_key"),
    }


# -- custom rules --------------------------------------------------------------------------------


def test_custom_patterns_run_after_the_builtins() -> None:
    redactor = Redactor.build(["email"], {"employee_id": r"\bEMP-\d{6}\b", "ticket": r"T#\d+"})
    assert [r.name for r in redactor.rules] == ["email", "employee_id", "ticket"]
    masked, count = redactor.text("EMP-123456 (jane@example.com) T#42; EMP-12 stays")
    assert masked == (
        f"{marker('employee_id')} ({marker('email')}) {marker('ticket')}; EMP-12 stays"
    )
    assert count == 3


def test_custom_only() -> None:
    redactor = Redactor.build([], {"codename": r"(?i)\bproject\s+falcon\b"})
    assert redactor.text(f"Project  Falcon, {OPENAI_LEGACY}") == (
        f"{marker('codename')}, {OPENAI_LEGACY}",
        1,
    )


def test_custom_secret_group_masks_only_the_group() -> None:
    redactor = Redactor.build([], {"password": r"\bpassword\s*[=:]\s*(?P<secret>\S+)"})
    assert redactor.text("login with password: hunter2 now") == (
        f"login with password: {marker('password')} now",
        1,
    )


def test_custom_name_may_reuse_a_disabled_builtin_name() -> None:
    redactor = Redactor.build(["jwt"], {"email": r"\b\w+@corp\b"})
    assert redactor.text("jane@corp") == (marker("email"), 1)


def test_zero_width_matches_insert_nothing() -> None:
    redactor = Redactor([Rule("edge", re.compile(r"\b|x"))])
    assert redactor.text("a box") == ("a bo[REDACTED:edge]", 1)


# -- errors --------------------------------------------------------------------------------------


def test_unknown_builtin_name() -> None:
    with pytest.raises(ValueError, match="unknown builtin redaction pattern") as info:
        Redactor.build(["email", "open_ai_key"], {})
    message = str(info.value)
    assert "'open_ai_key'" in message
    assert "openai_key" in message  # the known names are listed


def test_regex_that_does_not_compile() -> None:
    with pytest.raises(ValueError, match=r"redaction pattern 'broken' does not compile: .+"):
        Redactor.build([], {"ok": "fine", "broken": "(unclosed"})


def test_regex_that_matches_the_empty_string() -> None:
    with pytest.raises(ValueError, match="'anything' matches the empty string"):
        Redactor.build([], {"anything": "x*"})


@pytest.mark.parametrize("name", ["", "has space", "close]bracket", "x" * 65])
def test_bad_custom_name(name: str) -> None:
    with pytest.raises(ValueError, match="is not valid"):
        Redactor.build([], {name: "secret"})


def test_custom_name_clashing_with_an_enabled_builtin() -> None:
    with pytest.raises(ValueError, match="'email' have the name of an enabled builtin"):
        Redactor.build(["email"], {"email": r"\w+@corp"})


# -- json() --------------------------------------------------------------------------------------


def test_json_walks_nested_structures_and_leaves_keys_and_scalars() -> None:
    document: dict[str, Any] = {
        "jane@example.com": "key is not masked",
        "count": 3,
        "ratio": 0.5,
        "flag": True,
        "nothing": None,
        "list": [OPENAI_LEGACY, 7, [AWS, {"deep": f"Bearer {fake(20)}"}], []],
        "nested": {"a": {"b": {"c": "reach me at jane@example.com"}}},
        "empty": {},
    }
    before = copy.deepcopy(document)

    masked, count = FULL.json(document)

    assert count == 4
    assert masked == {
        "jane@example.com": "key is not masked",
        "count": 3,
        "ratio": 0.5,
        "flag": True,
        "nothing": None,
        "list": [
            marker("openai_key"),
            7,
            [marker("aws_access_key_id"), {"deep": f"Bearer {marker('bearer_token')}"}],
            [],
        ],
        "nested": {"a": {"b": {"c": f"reach me at {marker('email')}"}}},
        "empty": {},
    }
    assert list(masked) == list(document)  # key order kept
    assert document == before  # input not mutated
    assert masked is not document
    assert masked["list"] is not document["list"]
    assert masked["nested"]["a"] is not document["nested"]["a"]


@pytest.mark.parametrize("scalar", [1, 2.5, True, None, "plain"])
def test_json_top_level_scalars(scalar: Any) -> None:
    assert FULL.json(scalar) == (scalar, 0)


def test_json_top_level_string() -> None:
    assert FULL.json(AWS) == (marker("aws_access_key_id"), 1)


def test_json_deep_nesting_does_not_recurse() -> None:
    document: Any = OPENAI_LEGACY
    for depth in range(5000):
        document = [document] if depth % 2 else {"k": document}
    masked, count = FULL.json(document)
    assert count == 1
    for depth in reversed(range(5000)):
        masked = masked[0] if depth % 2 else masked["k"]
    assert masked == marker("openai_key")


def test_chat_request_body() -> None:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "temperature": 0.2,
        "store": True,
        "user": "jane@example.com",
        "metadata": {"team": "billing"},
        "messages": [
            {"role": "system", "content": "You help with deployments."},
            {"role": "user", "content": f"My key {OPENAI_PROJECT} fails, why?"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": f"AWS says {AWS} is invalid"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                    {"type": "text", "text": "no secret here"},
                ],
            },
        ],
    }
    raw = orjson.dumps(body)

    masked, count = FULL.json(orjson.loads(raw))

    assert count == 3
    assert masked["user"] == marker("email")
    assert masked["messages"][0] == body["messages"][0]
    assert masked["messages"][1]["content"] == f"My key {marker('openai_key')} fails, why?"
    parts = masked["messages"][2]["content"]
    assert parts[0] == {
        "type": "text",
        "text": f"AWS says {marker('aws_access_key_id')} is invalid",
    }
    assert parts[1:] == body["messages"][2]["content"][1:]
    assert {k: masked[k] for k in ("model", "temperature", "store", "metadata")} == {
        k: body[k] for k in ("model", "temperature", "store", "metadata")
    }
    assert orjson.loads(raw) == body  # what is forwarded is untouched


def test_stored_chat_completion() -> None:
    arguments = orjson.dumps({"token": "ghp_" + fake(36), "to": "ops@example.com"}).decode()
    completion = {
        "id": "chatcmpl-abc123",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": f"Set it with: export OPENAI_API_KEY={OPENAI_LEGACY}",
                    "refusal": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "send_token", "arguments": arguments},
                        }
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
    }
    before = copy.deepcopy(completion)

    masked, count = FULL.json(completion)

    assert count == 3
    message = masked["choices"][0]["message"]
    assert message["content"] == f"Set it with: export OPENAI_API_KEY={marker('openai_key')}"
    call = message["tool_calls"][0]
    assert call["id"] == "call_1"
    assert call["function"]["name"] == "send_token"
    assert orjson.loads(call["function"]["arguments"]) == {
        "token": marker("github_token"),
        "to": marker("email"),
    }
    assert masked["usage"] == completion["usage"]
    assert masked["id"] == "chatcmpl-abc123"
    assert completion == before


# -- document(): the JSON bytes decide which rules walk ------------------------------------------

# Fragments a document's strings are made of: secrets, things that carry a hint but are no
# secret ("task-based", "@decorator"), plain prose and non-ASCII text.
FRAGMENTS = [
    OPENAI_LEGACY,
    ANTHROPIC,
    AWS,
    JWT,
    f"Bearer {fake(24)}",
    "jane@example.com",
    "a task-based plan",
    "@dataclass",
    "plain prose, nothing to see",
    "naïve café",
    "日本語のテキスト",
]


def random_document(seed: int) -> dict[str, Any]:
    rnd = random.Random(seed)

    def text() -> str:
        return " ".join(rnd.sample(FRAGMENTS, rnd.randint(1, 3)))

    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text()} for _ in range(rnd.randint(1, 3))],
        "metadata": {"note": text()},
        "n": rnd.randint(1, 5),
    }


@pytest.mark.parametrize("ascii_only", [False, True], ids=["utf-8", "ensure_ascii"])
def test_document_masks_what_json_masks(ascii_only: bool) -> None:
    """Whichever rules the bytes let walk, the outcome is the full walk's (the bytes as orjson
    writes them, and as a client writes them with ``\\u`` escapes for non-ASCII)."""
    for seed in range(300):
        document = random_document(seed)
        encoded = json.dumps(document, ensure_ascii=ascii_only).encode()
        assert FULL.document(encoded, document) == FULL.json(document), seed


def test_document_without_any_hint_is_returned_as_it_is() -> None:
    document = {"messages": [{"role": "user", "content": "plain prose, nothing to see"}]}
    masked, count = FULL.document(orjson.dumps(document), document)
    assert masked is document
    assert count == 0


def test_document_walks_with_the_rules_whose_hints_it_holds() -> None:
    document = {"content": f"mail jane@example.com the key {OPENAI_LEGACY}", "id": AWS}
    masked, count = FULL.document(orjson.dumps(document), document)
    assert count == 3
    assert masked == {
        "content": f"mail {marker('email')} the key {marker('openai_key')}",
        "id": marker("aws_access_key_id"),
    }


def test_document_with_escapes_walks_with_every_rule() -> None:
    """A key whose prefix is a ``\\u`` escape has no hint in the bytes; an e-mail address
    elsewhere makes the document walk, and then every rule walks it, not only ``email``."""
    document = {"content": f"{OPENAI_LEGACY} from jane@example.com"}
    encoded = orjson.dumps(document).replace(b"sk-", b"\\u0073k-")
    assert b"sk-" not in encoded
    assert orjson.loads(encoded) == document
    masked, count = FULL.document(encoded, document)
    assert count == 2
    assert masked == {"content": f"{marker('openai_key')} from {marker('email')}"}


def _holds_a_hint(document: bytes, hints: list[bytes]) -> bool:
    return any(hint in document for hint in hints)


BUILTIN_HINTS = sorted({hint.encode() for hints in HINTS.values() for hint in hints})


@pytest.mark.parametrize(
    "hints",
    [BUILTIN_HINTS, [b"@", b"@x", b"x@"], [b"xox"], [b"(?<=", b"a.b", b"\\"]],
    ids=["builtin", "nested", "one", "regex-syntax"],
)
def test_hint_gates_find_exactly_the_documents_holding_a_hint(hints: list[bytes]) -> None:
    """Random documents made of the hints' own bytes (so near misses abound), and each hint
    alone, at the start, in the middle and at the end of other text."""
    gates = HintGates(hints)
    alphabet = sorted({bytes([b]) for hint in hints for b in hint} | {b" ", b"\n", b"e"})
    rnd = random.Random(7)
    for _ in range(20_000):
        document = b"".join(rnd.choices(alphabet, k=rnd.randint(0, 16)))
        assert gates.passes(document) == _holds_a_hint(document, hints), document
    for hint in hints:
        for document in (hint, b"prose " + hint, hint + b" prose", b"a" + hint + b"b"):
            assert gates.passes(document), document
        for cut in (hint[1:], hint[:-1]):
            if not _holds_a_hint(cut, hints):
                assert not gates.passes(b"prose " + cut + b" prose"), cut


# -- disabled ------------------------------------------------------------------------------------


@pytest.mark.parametrize("redactor", [Redactor([]), Redactor.build([], {})])
def test_empty_redactor_is_disabled_and_changes_nothing(redactor: Redactor) -> None:
    assert not redactor.enabled
    assert redactor.text(OPENAI_LEGACY) == (OPENAI_LEGACY, 0)
    document = {"messages": [{"role": "user", "content": f"{AWS} jane@example.com"}]}
    assert redactor.json(document) == (document, 0)


def test_full_redactor_is_enabled() -> None:
    assert FULL.enabled


# -- long input ----------------------------------------------------------------------------------


def test_one_megabyte_without_secrets() -> None:
    """Runs in well under a second; a pattern with catastrophic backtracking would not."""
    words = "the quick brown fox jumps over a lazy dog: risk-free task-based eyJ sk- @ 1234"
    rnd = random.Random(7)
    vocabulary = words.split()
    prose = " ".join(rnd.choice(vocabulary) for _ in range(250_000))[: 1 << 20]
    assert FULL.text(prose) == (prose, 0)


@pytest.mark.parametrize(
    "hostile",
    [
        "a" * (1 << 20),
        "a." * (1 << 19),
        "eyJa-" * (1 << 18),
        "a@" * (1 << 19),
        "-" * (1 << 20),
        "Bearer " * (1 << 17),
        "-----BEGIN PRIVATE KEY-----!" * (1 << 15),
    ],
    ids=["letters", "dotted", "jwt-like", "at-signs", "dashes", "bearer", "pem-headers"],
)
def test_one_megabyte_of_hostile_input(hostile: str) -> None:
    """Strings built to make a careless pattern rescan or backtrack; just has to finish."""
    masked, _ = FULL.text(hostile)
    assert len(masked) > 0
