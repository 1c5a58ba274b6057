"""Replay: record through the proxy, stop the upstream, answer from the recordings."""

from __future__ import annotations

import asyncio
import hashlib
import random
import sqlite3
from pathlib import Path

import openai
import orjson
import pytest

from proxy.assemble import fold_chunks
from proxy.identity import essential, key_version, lookup_keys, request_key
from proxy.replay import recorded_answer, stream_chunks
from proxy.store.sqlite import SQLiteStore
from tests.fakes import FakeUpstream, Reply, sse
from tests.helpers import ASK, TOOLS, sdk, tool_completion
from tests.processes import run_cli


def tool_chunks(completion_id: str) -> list[dict]:
    base = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": 1700000002,
        "model": "gpt-test-2024-01-01",
    }

    def delta(d: dict, finish: str | None = None) -> dict:
        return {**base, "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}

    return [
        delta({"role": "assistant", "content": None}),
        delta(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_s",
                        "type": "function",
                        "function": {"name": "weather", "arguments": ""},
                    }
                ]
            }
        ),
        delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        delta({"tool_calls": [{"index": 0, "function": {"arguments": '"Nice"}'}}]}),
        delta({}, "tool_calls"),
        {
            **base,
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14},
        },
    ]


async def final_of_stream(client: openai.AsyncOpenAI, **kwargs):
    async with client.chat.completions.stream(**kwargs) as stream:
        async for _ in stream:
            pass
        return await stream.get_final_completion()


def essence(completion) -> dict:
    """What a user compares: id, model, choices' messages, finish reasons, usage."""
    return {
        "id": completion.id,
        "model": completion.model,
        "choices": [
            {
                "content": c.message.content,
                "refusal": c.message.refusal,
                "tool_calls": [
                    (t.id, t.function.name, t.function.arguments)
                    for t in c.message.tool_calls or []
                ],
                "finish_reason": c.finish_reason,
            }
            for c in completion.choices
        ],
        "usage": completion.usage.total_tokens if completion.usage else None,
    }


@pytest.fixture
async def recorded(proxy, upstream: FakeUpstream):
    """Record a plain answer with tool calls and a streamed one, then stop the upstream."""
    upstream.script(Reply(json=tool_completion("chatcmpl-plain-rec")))
    async with sdk(proxy) as client:
        plain = await client.chat.completions.create(
            model="gpt-test", messages=ASK, tools=TOOLS, store=True
        )
        upstream.script(Reply(sse=sse(tool_chunks("chatcmpl-stream-rec"))))
        streamed = await final_of_stream(
            client,
            model="gpt-test",
            messages=[{"role": "user", "content": "and in Nice?"}],
            tools=TOOLS,
            store=True,
            stream_options={"include_usage": True},
        )
        text = await client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "plain text"}],
            store=True,
            temperature=1.0,
        )
    await upstream.server.close()  # type: ignore[attr-defined]
    return {"plain": plain, "streamed": streamed, "text": text}


async def test_plain_recording_replays_as_plain_and_as_stream(proxy_factory, recorded) -> None:
    proxy = await proxy_factory(replay={"mode": "strict"})
    async with sdk(proxy) as client:
        again = await client.chat.completions.create(model="gpt-test", messages=ASK, tools=TOOLS)
        assert essence(again) == essence(recorded["plain"])
        as_stream = await final_of_stream(
            client,
            model="gpt-test",
            messages=ASK,
            tools=TOOLS,
            stream_options={"include_usage": True},
        )
        assert essence(as_stream) == essence(recorded["plain"])
        text = await final_of_stream(
            client,
            model="gpt-test",
            messages=[{"role": "user", "content": "plain text"}],
            temperature=1,
        )
        assert (
            text.choices[0].message.content
            == recorded["text"].choices[0].message.content
            == "echo: plain text"
        )


async def test_streamed_recording_replays_as_plain_and_as_stream(proxy_factory, recorded) -> None:
    proxy = await proxy_factory(replay={"mode": "strict"})
    request = {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "and in Nice?"}],
        "tools": TOOLS,
    }
    async with sdk(proxy) as client:
        plain = await client.chat.completions.create(**request)
        assert essence(plain) == essence(recorded["streamed"])
        assert plain.choices[0].message.tool_calls[0].function.arguments == '{"city": "Nice"}'
        streamed = await final_of_stream(client, **request, stream_options={"include_usage": True})
        assert essence(streamed) == essence(recorded["streamed"])


async def test_replayed_answers_say_so(proxy_factory, recorded) -> None:
    proxy = await proxy_factory(replay={"mode": "strict"})
    response = await proxy.post(
        "/v1/chat/completions",
        json={"model": "gpt-test", "messages": ASK, "tools": TOOLS},
        headers={"Authorization": "Bearer sk-test-alice"},
    )
    assert response.status == 200
    assert response.headers["x-replay"] == "chatcmpl-plain-rec"
    body = await response.json()
    assert "request_id" not in body and "seed" not in body  # the upstream's answer, as it was


async def test_strict_miss_is_a_non_retried_400_and_calls_nothing(
    proxy_factory, recorded, upstream: FakeUpstream
) -> None:
    proxy = await proxy_factory(replay={"mode": "strict"})
    calls = len(upstream.received)
    async with sdk(proxy) as client:
        for changed in (
            {"model": "gpt-other", "messages": ASK, "tools": TOOLS},
            {
                "model": "gpt-test",
                "messages": [{"role": "user", "content": "weather in Rome?"}],
                "tools": TOOLS,
            },
            {"model": "gpt-test", "messages": ASK},
            {"model": "gpt-test", "messages": ASK, "tools": TOOLS, "seed": 1},
            {"model": "gpt-test", "messages": ASK, "tools": TOOLS, "n": 2},
        ):
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(**changed)
            assert caught.value.code == "replay_miss"
        with pytest.raises(openai.BadRequestError) as caught:
            await client.models.list()
        assert caught.value.code == "replay_miss"
    assert len(upstream.received) == calls


async def test_matching_ignores_key_order_number_spelling_and_bookkeeping(
    proxy_factory, recorded
) -> None:
    proxy = await proxy_factory(replay={"mode": "strict"})
    raw = (
        b'{"temperature": 1, "messages": [{"content": "plain text", "role": "user"}],'
        b' "model": "gpt-test", "store": false, "metadata": {"run": "ci"}, "user": "someone",'
        b' "stream": false}'
    )
    response = await proxy.post(
        "/v1/chat/completions",
        data=raw,
        headers={"Authorization": "Bearer sk-test-alice", "Content-Type": "application/json"},
    )
    assert response.status == 200
    assert (await response.json())["id"] == recorded["text"].id
    spelled = raw.replace(b'"temperature": 1,', b'"temperature": 1.0e0,')
    response = await proxy.post(
        "/v1/chat/completions",
        data=spelled,
        headers={"Authorization": "Bearer sk-test-alice", "Content-Type": "application/json"},
    )
    assert response.status == 200


async def test_scope_is_the_caller_unless_shared(proxy_factory, recorded) -> None:
    own = await proxy_factory(replay={"mode": "strict"})
    async with sdk(own, "sk-someone-else") as stranger:
        with pytest.raises(openai.BadRequestError):
            await stranger.chat.completions.create(model="gpt-test", messages=ASK, tools=TOOLS)
    shared = await proxy_factory(replay={"mode": "strict", "shared": True})
    async with sdk(shared, "sk-ci-throwaway") as ci:
        again = await ci.chat.completions.create(model="gpt-test", messages=ASK, tools=TOOLS)
        assert again.id == recorded["plain"].id


async def test_several_recordings_play_in_order_then_the_last_repeats(
    proxy_factory, upstream: FakeUpstream
) -> None:
    recorder = await proxy_factory()
    request = {"model": "gpt-test", "messages": [{"role": "user", "content": "roll a die"}]}
    async with sdk(recorder) as client:
        ids = [(await client.chat.completions.create(**request, store=True)).id for _ in range(3)]
    player = await proxy_factory(replay={"mode": "strict"})
    async with sdk(player) as client:
        played = [(await client.chat.completions.create(**request)).id for _ in range(5)]
    assert played == [ids[0], ids[1], ids[2], ids[2], ids[2]]


async def test_fallback_forwards_and_records_a_miss_then_replays_it(
    proxy_factory, upstream: FakeUpstream
) -> None:
    proxy = await proxy_factory(replay={"mode": "fallback"})
    request = {"model": "gpt-test", "messages": [{"role": "user", "content": "fresh question"}]}
    async with sdk(proxy) as client:
        first = await client.chat.completions.create(
            **request
        )  # no store flag: fallback records anyway
        calls = len(upstream.received)
        second = await client.chat.completions.create(**request, stream=True)
        ids = {chunk.id async for chunk in second}
        assert ids == {first.id}
        assert len(upstream.received) == calls
        assert (await client.chat.completions.retrieve(first.id)).id == first.id


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ({"model": "m", "temperature": 1}, {"temperature": 1.0, "model": "m"}, True),
        ({"model": "m", "x": [1.0, 2.5]}, {"model": "m", "x": [1, 2.5]}, True),
        (
            {"model": "m"},
            {"model": "m", "stream": True, "store": True, "metadata": {"a": "b"}, "user": "u"},
            True,
        ),
        ({"model": "m"}, {"model": "m", "stream_options": {"include_usage": True}}, True),
        ({"model": "m"}, {"model": "n"}, False),
        ({"model": "m", "seed": 1}, {"model": "m", "seed": 2}, False),
        ({"model": "m", "temperature": 1.5}, {"model": "m", "temperature": 1}, False),
        ({"model": "m", "n": 1}, {"model": "m"}, False),
    ],
)
def test_request_key(a: dict, b: dict, same: bool) -> None:
    assert (request_key(a) == request_key(b)) is same


_NUMBERS = (1, 1.0, -3.0, 0.0, -0.0, 0.5, 2.25, 1e15, 2.0**53, 2.0**53 - 1, 1e17, float("inf"))
_STRINGS = ("", "v1.0", "x.0y", "plain", "\u00e9.0", ".0")


def _random_json(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(4 if depth < 3 else 2)
    if kind == 0:
        return rng.choice(_NUMBERS)
    if kind == 1:
        return rng.choice(_STRINGS)
    if kind == 2:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice("abcde"): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def test_request_key_is_the_hash_of_the_canonical_form_whatever_the_numbers() -> None:
    """The key skips the canonical walk when the JSON shows no integral float; it must equal
    the hash of the canonical form (every integral float below 2**53 an int) all the same."""
    rng = random.Random(20261130)
    for _ in range(3_000):
        request = {"model": "m", "stream": rng.random() < 0.5, "x": _random_json(rng)}
        canonical = orjson.dumps(essential(request), option=orjson.OPT_SORT_KEYS)
        assert request_key(request) == "v1:" + hashlib.sha256(canonical).hexdigest()[:32]


def test_stream_chunks_fold_back_to_the_completion() -> None:
    completion = tool_completion("chatcmpl-fold")
    completion["choices"].append(
        {
            "index": 1,
            "message": {"role": "assistant", "content": "text", "refusal": None},
            "finish_reason": "stop",
            "logprobs": {
                "content": [{"token": "text", "logprob": -0.1, "bytes": None, "top_logprobs": []}],
                "refusal": None,
            },
        }
    )
    completion["service_tier"] = "default"
    folded = fold_chunks(stream_chunks(completion, include_usage=True))
    assert folded["choices"] == completion["choices"]
    assert folded["usage"] == completion["usage"]
    assert (
        recorded_answer({**folded, "request_id": "x", "seed": 1, "metadata": {}})["id"]
        == "chatcmpl-fold"
    )


def test_keys_say_which_version_made_them() -> None:
    key = request_key({"model": "m", "messages": []})
    assert key.startswith("v1:") and len(key) == 35
    assert key_version(key) == 1
    assert lookup_keys({"messages": [], "model": "m"}) == (key[3:], key)
    assert key_version(key[3:]) == 0
    with pytest.raises(ValueError):
        key_version("x1:abc")


def stored_keys(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT request_key FROM completions ORDER BY seq")]


async def test_a_recording_stored_under_an_older_key_version_still_replays(
    proxy_factory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "completions.db"
    recorder = await proxy_factory()
    request = {"model": "gpt-test", "messages": [{"role": "user", "content": "old times"}]}
    async with sdk(recorder) as client:
        old = await client.chat.completions.create(**request, store=True)
    # A database written before keys carried a version holds the bare hash.
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE completions SET request_key = substr(request_key, 4)")
    assert [key_version(k) for k in stored_keys(db)] == [0]
    player = await proxy_factory(replay={"mode": "strict"})
    async with sdk(player) as client:
        new = await client.chat.completions.create(**request, store=True)
        assert new.id == old.id
        streamed = await client.chat.completions.create(**request, stream=True)
        assert {chunk.id async for chunk in streamed} == {old.id}


async def test_old_and_new_key_versions_of_one_request_play_in_recorded_order(
    proxy_factory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "completions.db"
    recorder = await proxy_factory()
    request = {"model": "gpt-test", "messages": [{"role": "user", "content": "again"}]}
    async with sdk(recorder) as client:
        first = await client.chat.completions.create(**request, store=True)
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE completions SET request_key = substr(request_key, 4)")
        second = await client.chat.completions.create(**request, store=True)
    assert [key_version(k) for k in stored_keys(db)] == [0, 1]
    player = await proxy_factory(replay={"mode": "strict"})
    async with sdk(player) as client:
        played = [(await client.chat.completions.create(**request)).id for _ in range(3)]
    assert played == [first.id, second.id, second.id]


async def cli(*args: str) -> str:
    done = await asyncio.to_thread(run_cli, *args)
    assert done.returncode == 0, done.stderr
    return done.stderr


async def test_recordings_moved_to_a_fresh_database_replay_for_the_key_that_made_them(
    proxy_factory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Record with a key, export, import into a fresh database, replay with the same key."""
    recorder = await proxy_factory(store={"url": str(tmp_path / "record.db")})
    request = {"model": "gpt-test", "messages": ASK, "tools": TOOLS}
    upstream.script(Reply(json=tool_completion("chatcmpl-moved")))
    async with sdk(recorder, "sk-proj-alice") as client:
        original = await client.chat.completions.create(**request, store=True)
    exported = tmp_path / "recording.jsonl"
    await cli("export", "--db", str(tmp_path / "record.db"), "-o", str(exported))
    assert b"sk-proj-alice" not in exported.read_bytes()
    await upstream.server.close()  # type: ignore[attr-defined]
    await cli("import", str(exported), "--db", str(tmp_path / "fresh.db"))
    player = await proxy_factory(
        store={"url": str(tmp_path / "fresh.db")}, replay={"mode": "strict"}
    )
    async with sdk(player, "sk-proj-alice") as client:
        again = await client.chat.completions.create(**request)
        assert essence(again) == essence(original)
        assert (await client.chat.completions.retrieve(original.id)).id == original.id
    async with sdk(player, "sk-proj-bob") as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(**request)
    assert caught.value.code == "replay_miss"
    message = caught.value.message
    assert "1 recording(s) of this request exist under other callers" in message
    assert "replay.shared: true" in message
    with sqlite3.connect(tmp_path / "fresh.db") as conn:
        stored = conn.execute("SELECT value FROM settings WHERE name = 'caller_secret'").fetchone()
    assert stored == (b"",)  # no secret at rest


async def test_a_keyed_recording_moved_without_its_secret_misses_and_says_why(
    proxy_factory, upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALLERS_SECRET", "a-team-secret-of-enough-bytes")
    recorder = await proxy_factory(
        store={"url": str(tmp_path / "record.db")}, callers={"secret_env": "CALLERS_SECRET"}
    )
    request = {"model": "gpt-test", "messages": [{"role": "user", "content": "keyed"}]}
    async with sdk(recorder, "sk-proj-alice") as client:
        await client.chat.completions.create(**request, store=True)
    exported = tmp_path / "recording.jsonl"
    await cli("export", "--db", str(tmp_path / "record.db"), "-o", str(exported))
    await cli("import", str(exported), "--db", str(tmp_path / "fresh.db"))
    player = await proxy_factory(
        store={"url": str(tmp_path / "fresh.db")}, replay={"mode": "strict"}
    )
    async with sdk(player, "sk-proj-alice") as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(**request)
    assert "exist under other callers" in caught.value.message
    shared = await proxy_factory(
        store={"url": str(tmp_path / "fresh.db")}, replay={"mode": "strict", "shared": True}
    )
    async with sdk(shared, "sk-proj-alice") as client:
        assert (await client.chat.completions.create(**request)).choices[0].message.content


async def test_a_database_with_a_generated_secret_keeps_its_callers(
    proxy_factory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Databases made before portable fingerprints keep the secret they generated."""
    old = SQLiteStore(str(tmp_path / "old.db"))
    await old.open()
    await old.setting("caller_secret", b"0123456789abcdef0123456789abcdef")
    await old.close()
    callers = {}
    for name in ("old", "new", "newer"):
        proxy = await proxy_factory(store={"url": str(tmp_path / f"{name}.db")})
        async with sdk(proxy, "sk-proj-alice") as client:
            await client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "who"}], store=True
            )
        with sqlite3.connect(tmp_path / f"{name}.db") as conn:
            callers[name] = conn.execute("SELECT caller FROM completions").fetchone()[0]
    assert callers["new"] == callers["newer"] != callers["old"]
