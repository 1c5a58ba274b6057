"""The official openai SDK against the proxy in front of the fake upstream: every endpoint."""

from __future__ import annotations

import openai
import pytest

from tests.fakes import FakeUpstream
from tests.helpers import sdk

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello"},
]


async def create(client: openai.AsyncOpenAI, text: str = "hello", **kwargs):
    return await client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": text}],
        store=True,
        **kwargs,
    )


async def test_plain_create_round_trips_through_retrieve(
    alice: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    made = await alice.chat.completions.create(
        model="gpt-test",
        messages=MESSAGES,
        store=True,
        metadata={"topic": "greeting"},
        temperature=0.2,
        seed=7,
        user="user-1",
    )
    assert made.choices[0].message.content == "echo: hello"
    got = await alice.chat.completions.retrieve(made.id)
    assert got.id == made.id
    assert got.choices[0].message.content == "echo: hello"
    assert got.metadata == {"topic": "greeting"}
    extra = got.model_extra or {}
    assert extra["request_id"] == f"req-up-{made.id}"
    assert extra["temperature"] == 0.2
    assert extra["seed"] == 7
    assert extra["input_user"] == "user-1"
    assert extra["tools"] is None
    assert got.usage is not None and got.usage.total_tokens == 12


async def test_request_bytes_reach_upstream_unchanged(proxy, upstream: FakeUpstream) -> None:
    raw = (
        b'{"model":"gpt-test", "messages":[{"role":"user","content":"caf\\u00e9"}],  "store":true}'
    )
    response = await proxy.post(
        "/v1/chat/completions",
        data=raw,
        headers={"Authorization": "Bearer sk-raw", "Content-Type": "application/json"},
    )
    assert response.status == 200
    received = upstream.chat_requests()[-1]
    assert received.body == raw
    assert received.headers["Authorization"] == "Bearer sk-raw"


async def test_streamed_create_is_stored_as_a_completion(alice: openai.AsyncOpenAI) -> None:
    stream = await alice.chat.completions.create(
        model="gpt-test",
        messages=MESSAGES,
        store=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    completion_id = None
    async for chunk in stream:
        completion_id = chunk.id
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text == "echo: hello"
    got = await alice.chat.completions.retrieve(completion_id)
    assert got.object == "chat.completion"
    assert got.choices[0].message.content == "echo: hello"
    assert got.choices[0].finish_reason == "stop"
    assert got.usage is not None and got.usage.total_tokens == 12


async def test_store_false_is_forwarded_but_not_stored(alice: openai.AsyncOpenAI) -> None:
    made = await alice.chat.completions.create(model="gpt-test", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        await alice.chat.completions.retrieve(made.id)
    page = await alice.chat.completions.list()
    assert page.data == []


async def test_list_pages_through_everything_in_order(alice: openai.AsyncOpenAI) -> None:
    made = [
        await create(alice, f"m{i}", metadata={"batch": "a" if i % 2 else "b"}) for i in range(7)
    ]
    ids = [c.id for c in made]
    seen = [c.id async for c in alice.chat.completions.list(limit=3)]
    assert seen == ids
    first = await alice.chat.completions.list(limit=3)
    assert first.has_more is True
    assert [c.id for c in first.data] == ids[:3]
    newest = await alice.chat.completions.list(limit=2, order="desc")
    assert [c.id for c in newest.data] == ids[::-1][:2]
    desc_all = [c.id async for c in alice.chat.completions.list(limit=2, order="desc")]
    assert desc_all == ids[::-1]
    odd = [c.id async for c in alice.chat.completions.list(metadata={"batch": "a"}, limit=2)]
    assert odd == ids[1::2]
    by_model = await alice.chat.completions.list(model="gpt-test")
    assert len(by_model.data) == 7
    none = await alice.chat.completions.list(model="other")
    assert none.data == [] and none.has_more is False


async def test_list_metadata_filters_are_anded(alice: openai.AsyncOpenAI) -> None:
    both = await create(alice, metadata={"a": "1", "b": "2"})
    await create(alice, metadata={"a": "1", "b": "3"})
    await create(alice, metadata={"a": "0", "b": "2"})
    page = await alice.chat.completions.list(metadata={"a": "1", "b": "2"})
    assert [c.id for c in page.data] == [both.id]


async def test_metadata_value_with_spaces_and_brackets(alice: openai.AsyncOpenAI) -> None:
    made = await create(alice, metadata={"topic [x]": "hello world & more"})
    page = await alice.chat.completions.list(metadata={"topic [x]": "hello world & more"})
    assert [c.id for c in page.data] == [made.id]


async def test_empty_list_shape(proxy) -> None:
    response = await proxy.get("/v1/chat/completions", headers={"Authorization": "Bearer sk-x"})
    assert response.status == 200
    assert await response.json() == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


async def test_update_replaces_metadata_and_null_clears(alice: openai.AsyncOpenAI) -> None:
    made = await create(alice, metadata={"a": "1", "b": "2"})
    updated = await alice.chat.completions.update(made.id, metadata={"c": "3"})
    assert updated.metadata == {"c": "3"}
    assert updated.choices[0].message.content == "echo: hello"
    assert (await alice.chat.completions.retrieve(made.id)).metadata == {"c": "3"}
    assert [c.id for c in (await alice.chat.completions.list(metadata={"c": "3"})).data] == [
        made.id
    ]
    assert (await alice.chat.completions.list(metadata={"a": "1"})).data == []
    cleared = await alice.chat.completions.update(made.id, metadata=None)
    assert cleared.metadata == {}


async def test_delete_then_everything_is_404(alice: openai.AsyncOpenAI) -> None:
    made = await create(alice)
    deleted = await alice.chat.completions.delete(made.id)
    assert deleted.deleted is True and deleted.id == made.id
    assert deleted.object == "chat.completion.deleted"
    for call in (
        alice.chat.completions.retrieve(made.id),
        alice.chat.completions.update(made.id, metadata={"a": "b"}),
        alice.chat.completions.delete(made.id),
        alice.chat.completions.messages.list(made.id),
    ):
        with pytest.raises(openai.NotFoundError):
            await call
    assert (await alice.chat.completions.list()).data == []


async def test_deleting_while_paging_keeps_paging(alice: openai.AsyncOpenAI) -> None:
    made = [await create(alice, f"m{i}") for i in range(5)]
    deleted = []
    async for completion in alice.chat.completions.list(limit=2):
        await alice.chat.completions.delete(completion.id)
        deleted.append(completion.id)
    assert deleted == [c.id for c in made]


async def test_messages_lists_input_in_order_with_real_roles(alice: openai.AsyncOpenAI) -> None:
    made = await alice.chat.completions.create(
        model="gpt-test",
        store=True,
        messages=[
            {"role": "developer", "content": "rules"},
            {
                "role": "user",
                "name": "ann",
                "content": [{"type": "text", "text": "look"}, {"type": "text", "text": "here"}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "f", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
            {"role": "user", "content": "thanks"},
        ],
    )
    messages = [m async for m in alice.chat.completions.messages.list(made.id, limit=2)]
    assert [m.id for m in messages] == [f"{made.id}-{i}" for i in range(5)]
    assert [m.role for m in messages] == ["developer", "user", "assistant", "tool", "user"]
    assert messages[1].content == "look\nhere"
    assert messages[1].name == "ann"
    assert messages[1].content_parts is not None and len(messages[1].content_parts) == 2
    assert messages[0].content_parts is None
    assert messages[2].tool_calls is not None and messages[2].tool_calls[0].id == "call_1"
    assert (messages[3].model_extra or {})["tool_call_id"] == "call_1"
    desc = await alice.chat.completions.messages.list(made.id, order="desc", limit=2)
    assert [m.id for m in desc.data] == [f"{made.id}-4", f"{made.id}-3"]
    assert desc.has_more is True


async def test_callers_see_only_their_own(
    alice: openai.AsyncOpenAI, bob: openai.AsyncOpenAI
) -> None:
    mine = await create(alice)
    theirs = await create(bob)
    assert [c.id for c in (await alice.chat.completions.list()).data] == [mine.id]
    assert [c.id for c in (await bob.chat.completions.list()).data] == [theirs.id]
    for call in (
        bob.chat.completions.retrieve(mine.id),
        bob.chat.completions.update(mine.id, metadata={"x": "y"}),
        bob.chat.completions.delete(mine.id),
        bob.chat.completions.messages.list(mine.id),
    ):
        with pytest.raises(openai.NotFoundError):
            await call
    with pytest.raises(openai.BadRequestError):
        await bob.chat.completions.list(after=mine.id)
    assert (await alice.chat.completions.retrieve(mine.id)).metadata == {}


async def test_other_routes_are_forwarded(
    alice: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    models = await alice.models.list()
    assert [m.id for m in models.data] == ["gpt-test"]
    assert upstream.received[-1].path == "/v1/models"
    assert upstream.received[-1].headers["Authorization"] == "Bearer sk-test-alice"


async def test_callers_survive_a_restart_on_the_same_file(
    proxy_factory, alice: openai.AsyncOpenAI
) -> None:
    made = await create(alice)
    restarted = await proxy_factory()
    async with sdk(restarted, "sk-test-alice") as again:
        assert (await again.chat.completions.retrieve(made.id)).id == made.id
    async with sdk(restarted, "sk-test-mallory") as other:
        with pytest.raises(openai.NotFoundError):
            await other.chat.completions.retrieve(made.id)


async def test_healthz(proxy) -> None:
    response = await proxy.get("/healthz")
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "ok"
    assert body["store"]["writable"] is True
