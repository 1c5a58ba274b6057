"""Replay: record through the proxy, stop the upstream, answer from the recordings."""

from __future__ import annotations

import openai
import pytest

from proxy.assemble import fold_chunks
from proxy.replay import recorded_answer, request_key, stream_chunks
from tests.fakes import FakeUpstream, Reply, sse
from tests.helpers import ASK, TOOLS, sdk, tool_completion


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
