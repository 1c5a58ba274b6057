"""Unit tests for proxy.assemble: folding a stream, the stored form and the API shapes."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from proxy.assemble import (
    ECHOED_FIELDS,
    AssemblyError,
    chunks_of,
    completion_from_body,
    completion_from_stream,
    fold_chunks,
    input_messages,
    is_finished,
    list_body,
    stored_completion,
    with_metadata,
)

Json = dict[str, Any]

ID = "chatcmpl-abc123"
CREATED = 1_700_000_000
MODEL = "gpt-4o-mini-2024-07-18"


def choice(
    index: int = 0,
    finish_reason: str | None = None,
    logprobs: Json | None = None,
    **delta: Any,
) -> Json:
    """One entry of a chunk's ``choices``; keyword arguments form the delta."""
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def chunk(*choices: Json, **fields: Any) -> Json:
    """A ``chat.completion.chunk`` as OpenAI streams it."""
    base: Json = {
        "id": ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": list(choices),
        "usage": None,
    }
    return base | fields


def sse(*chunks: Json, done: bool = True) -> bytes:
    """The SSE bytes of ``chunks``, ended by ``[DONE]`` unless ``done`` is false."""
    events = [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks]
    if done:
        events.append(b"data: [DONE]\n\n")
    return b"".join(events)


def tool_delta(
    index: int,
    call_id: str | None = None,
    name: str | None = None,
    arguments: str | None = None,
    call_type: str | None = None,
) -> Json:
    """One entry of a delta's ``tool_calls``, with only the fields given."""
    delta: Json = {"index": index}
    if call_id is not None:
        delta["id"] = call_id
    if call_type is not None:
        delta["type"] = call_type
    function = {k: v for k, v in (("name", name), ("arguments", arguments)) if v is not None}
    if function:
        delta["function"] = function
    return delta


USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


# -- fold_chunks -----------------------------------------------------------------------------


def test_fold_simple_stream_into_a_completion() -> None:
    completion = fold_chunks(
        [
            chunk(choice(role="assistant", content="")),
            chunk(choice(content="Hel")),
            chunk(choice(content="lo!")),
            chunk(choice(finish_reason="stop")),
        ]
    )
    assert completion == {
        "id": ID,
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!", "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
    }  # no usage, system_fingerprint or service_tier: absent, not null


def test_fold_content_is_none_without_any_content_delta() -> None:
    completion = fold_chunks([chunk(choice(role="assistant")), chunk(choice(finish_reason="stop"))])
    assert completion["choices"][0]["message"]["content"] is None


def test_fold_empty_content_pieces_give_an_empty_string() -> None:
    completion = fold_chunks([chunk(choice(content="")), chunk(choice(content=None))])
    assert completion["choices"][0]["message"]["content"] == ""


def test_fold_refusal_concatenates() -> None:
    completion = fold_chunks(
        [
            chunk(choice(role="assistant", refusal="I can")),
            chunk(choice(refusal="'t help")),
            chunk(choice(refusal=" with that.", finish_reason="stop")),
        ]
    )
    message = completion["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "refusal": "I can't help with that."}


def test_fold_role_from_the_delta_default_assistant() -> None:
    assert fold_chunks([chunk(choice(content="x"))])["choices"][0]["message"]["role"] == (
        "assistant"
    )
    folded = fold_chunks([chunk(choice(role="developer", content="x"))])
    assert folded["choices"][0]["message"]["role"] == "developer"


def test_fold_several_choices_interleaved() -> None:
    completion = fold_chunks(
        [
            chunk(choice(1, role="assistant", content="")),
            chunk(choice(0, role="assistant", content="")),
            chunk(choice(0, content="A"), choice(1, content="X")),
            chunk(choice(1, content="Y")),
            chunk(choice(0, content="B")),
            chunk(choice(1, finish_reason="length")),
            chunk(choice(0, content="C", finish_reason="stop")),
        ]
    )
    assert [c["index"] for c in completion["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in completion["choices"]] == ["ABC", "XY"]
    assert [c["finish_reason"] for c in completion["choices"]] == ["stop", "length"]


def test_fold_choice_index_defaults_to_zero() -> None:
    completion = fold_chunks(
        [chunk({"delta": {"content": "a"}}), chunk({"delta": {"content": "b"}})]
    )
    assert completion["choices"][0]["index"] == 0
    assert completion["choices"][0]["message"]["content"] == "ab"


def test_fold_finish_reason_from_the_chunk_that_sets_it() -> None:
    completion = fold_chunks(
        [
            chunk(choice(content="a")),
            chunk(choice(finish_reason="tool_calls")),
            chunk(choice(finish_reason=None)),  # a later null does not erase it
        ]
    )
    assert completion["choices"][0]["finish_reason"] == "tool_calls"


def test_fold_two_parallel_tool_calls() -> None:
    completion = fold_chunks(
        [
            chunk(choice(role="assistant", content=None)),
            chunk(choice(tool_calls=[tool_delta(0, "call_a", "get_weather", "", "function")])),
            chunk(choice(tool_calls=[tool_delta(0, arguments='{"city": ')])),
            chunk(choice(tool_calls=[tool_delta(1, "call_b", "get_time", "", "function")])),
            chunk(choice(tool_calls=[tool_delta(1, arguments='{"tz": "UTC"}')])),
            chunk(choice(tool_calls=[tool_delta(0, arguments='"Paris"}')])),
            chunk(choice(finish_reason="tool_calls")),
        ]
    )
    message = completion["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'},
        },
    ]
    for call in message["tool_calls"]:
        orjson.loads(call["function"]["arguments"])  # concatenated into valid JSON


def test_fold_tool_calls_in_one_delta_and_ordered_by_index() -> None:
    completion = fold_chunks(
        [
            chunk(choice(tool_calls=[tool_delta(1, "call_b", "b", "{}"), tool_delta(0, "call_a")])),
            chunk(choice(tool_calls=[tool_delta(0, name="a", arguments="{}")])),
        ]
    )
    calls = completion["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"]) for c in calls] == [("call_a", "a"), ("call_b", "b")]


def test_fold_tool_call_id_type_and_name_from_the_first_delta_that_has_them() -> None:
    completion = fold_chunks(
        [
            chunk(choice(tool_calls=[tool_delta(0, arguments="{")])),
            chunk(choice(tool_calls=[tool_delta(0, "call_1", "lookup", '"q"', "function")])),
            chunk(choice(tool_calls=[tool_delta(0, "call_2", "other", ": 1}", "custom")])),
        ]
    )
    (call,) = completion["choices"][0]["message"]["tool_calls"]
    assert call == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "lookup", "arguments": '{"q": 1}'},
    }


def test_fold_tool_call_type_defaults_to_function() -> None:
    completion = fold_chunks([chunk(choice(tool_calls=[tool_delta(0, "call_1", "f", "{}")]))])
    (call,) = completion["choices"][0]["message"]["tool_calls"]
    assert call["type"] == "function"


def test_fold_tool_calls_stay_with_their_choice() -> None:
    completion = fold_chunks(
        [
            chunk(choice(0, tool_calls=[tool_delta(0, "call_0", "f", "{}")])),
            chunk(choice(1, content="no tools here")),
        ]
    )
    first, second = completion["choices"]
    assert [c["id"] for c in first["message"]["tool_calls"]] == ["call_0"]
    assert "tool_calls" not in second["message"]


def test_fold_legacy_function_call() -> None:
    completion = fold_chunks(
        [
            chunk(choice(role="assistant", function_call={"name": "get_weather", "arguments": ""})),
            chunk(choice(function_call={"arguments": '{"city":'})),
            chunk(choice(function_call={"name": "ignored", "arguments": ' "Oslo"}'})),
            chunk(choice(finish_reason="function_call")),
        ]
    )
    message = completion["choices"][0]["message"]
    assert message["function_call"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert "tool_calls" not in message


def test_fold_logprobs_content_lists_extend() -> None:
    first = [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]
    second = [
        {"token": "!", "logprob": -0.2, "bytes": [33], "top_logprobs": []},
        {"token": " ", "logprob": -0.3, "bytes": [32], "top_logprobs": []},
    ]
    completion = fold_chunks(
        [
            chunk(choice(role="assistant", content="")),  # no logprobs on the role chunk
            chunk(choice(content="Hi", logprobs={"content": first, "refusal": None})),
            chunk(choice(content="! ", logprobs={"content": second, "refusal": None})),
            chunk(choice(finish_reason="stop")),
        ]
    )
    assert completion["choices"][0]["logprobs"] == {"content": first + second, "refusal": None}


def test_fold_logprobs_refusal_lists_extend() -> None:
    a = [{"token": "No", "logprob": -0.5, "bytes": None, "top_logprobs": []}]
    b = [{"token": ".", "logprob": -0.6, "bytes": None, "top_logprobs": []}]
    completion = fold_chunks(
        [
            chunk(choice(refusal="No", logprobs={"content": None, "refusal": a})),
            chunk(choice(refusal=".", logprobs={"content": None, "refusal": b})),
        ]
    )
    assert completion["choices"][0]["logprobs"] == {"content": None, "refusal": a + b}


def test_fold_logprobs_per_choice() -> None:
    token = {"token": "x", "logprob": 0.0, "bytes": [120], "top_logprobs": []}
    completion = fold_chunks(
        [
            chunk(choice(0, content="x", logprobs={"content": [token]})),
            chunk(choice(1, content="y")),
        ]
    )
    assert completion["choices"][0]["logprobs"] == {"content": [token], "refusal": None}
    assert completion["choices"][1]["logprobs"] is None


def test_fold_usage_fingerprint_and_tier_from_the_last_chunk_that_has_them() -> None:
    completion = fold_chunks(
        [
            chunk(choice(content="a"), system_fingerprint="fp_1", service_tier="default"),
            chunk(choice(content="b"), system_fingerprint="fp_2", service_tier="flex"),
            chunk(choice(finish_reason="stop"), system_fingerprint=None, service_tier=None),
            chunk(usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}),
            chunk(usage=USAGE),
            chunk(usage=None),
        ]
    )
    assert completion["system_fingerprint"] == "fp_2"
    assert completion["service_tier"] == "flex"
    assert completion["usage"] == USAGE


def test_fold_include_usage_final_chunk_with_no_choices() -> None:
    completion = fold_chunks(
        [
            chunk(choice(role="assistant", content="Hi")),
            chunk(choice(finish_reason="stop")),
            chunk(usage=USAGE),  # choices: []
        ]
    )
    assert completion["usage"] == USAGE
    assert len(completion["choices"]) == 1
    assert completion["choices"][0]["message"]["content"] == "Hi"
    assert completion["choices"][0]["finish_reason"] == "stop"


def test_fold_head_from_the_first_chunk() -> None:
    completion = fold_chunks(
        [
            chunk(choice(content="a")),
            chunk(choice(content="b"), id="other", created=1, model="other-model"),
        ]
    )
    assert (completion["id"], completion["created"], completion["model"]) == (ID, CREATED, MODEL)
    assert completion["object"] == "chat.completion"


@pytest.mark.parametrize("obj", ["", "chat.completion", None, "list"])
def test_fold_skips_chunks_of_another_object(obj: str | None) -> None:
    # Azure sends prompt/content filter results as chunks with object "" and choices [] (or
    # choices whose delta is empty); they must neither become the head nor add content.
    other = chunk(
        choice(content="FILTERED", finish_reason="content_filter"),
        id="",
        object=obj,
        created=0,
        model="",
        usage=USAGE,
        prompt_filter_results=[{"prompt_index": 0, "content_filter_results": {}}],
    )
    completion = fold_chunks(
        [
            other,
            chunk(choice(role="assistant", content="Hi")),
            other,
            chunk(choice(finish_reason="stop")),
        ]
    )
    assert completion["id"] == ID
    assert completion["model"] == MODEL
    assert "usage" not in completion  # absent, not null: the schema types it as an object
    assert completion["choices"][0]["message"]["content"] == "Hi"
    assert completion["choices"][0]["finish_reason"] == "stop"


def test_fold_skips_a_chunk_without_object() -> None:
    without = chunk(choice(content="X"))
    del without["object"]
    completion = fold_chunks([chunk(choice(content="a")), without])
    assert completion["choices"][0]["message"]["content"] == "a"


def test_fold_annotations_extend() -> None:
    citation = {"type": "url_citation", "url_citation": {"url": "https://example.com"}}
    completion = fold_chunks(
        [chunk(choice(content="a", annotations=[citation])), chunk(choice(annotations=[citation]))]
    )
    assert completion["choices"][0]["message"]["annotations"] == [citation, citation]


@pytest.mark.parametrize(
    "chunks",
    [
        [],
        [chunk(object="")],
        [chunk(choice(content="x"), object="chat.completion")],
    ],
    ids=["nothing", "only-filter-events", "not-chunks"],
)
def test_fold_without_chunks_raises(chunks: list[Json]) -> None:
    with pytest.raises(AssemblyError):
        fold_chunks(chunks)


@pytest.mark.parametrize(
    "bad",
    [
        chunk(choices="oops"),
        chunk(choices=5),
        chunk(choices=[5]),
        chunk({"index": 0, "delta": "text"}),
        chunk(choice(content=5)),
        chunk(choice(content=["a"])),
        chunk(choice(refusal={"x": 1})),
        chunk(choice(tool_calls=5)),
        chunk(choice(tool_calls=["call"])),
        chunk(choice(tool_calls=[{"index": 0, "function": "f"}])),
        chunk(choice(tool_calls=[{"index": 0, "function": {"arguments": 5}}])),
        chunk(choice(function_call="f")),
        chunk(choice(content="a", logprobs=[1])),
        chunk(choice(content="a", logprobs={"content": 5})),
        chunk({"index": [0], "delta": {}}),
    ],
)
def test_fold_malformed_chunk_raises_assembly_error(bad: Json) -> None:
    with pytest.raises(AssemblyError):
        fold_chunks([chunk(choice(content="ok")), bad])


def test_fold_does_not_mutate_the_chunks() -> None:
    chunks = [
        chunk(choice(content="a", tool_calls=[tool_delta(0, "c", "f", "{")])),
        chunk(choice(content="b", tool_calls=[tool_delta(0, arguments="}")])),
    ]
    before = copy.deepcopy(chunks)
    fold_chunks(chunks)
    assert chunks == before


# -- is_finished -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("finish_reasons", "finished"),
    [
        (["stop"], True),
        (["stop", "length"], True),
        (["tool_calls"], True),
        ([None], False),
        (["stop", None], False),
        ([""], False),
        ([], False),
    ],
)
def test_is_finished(finish_reasons: list[str | None], finished: bool) -> None:
    completion = {
        "choices": [{"index": i, "finish_reason": r} for i, r in enumerate(finish_reasons)]
    }
    assert is_finished(completion) is finished


def test_is_finished_without_choices_key() -> None:
    assert is_finished({}) is False
    assert is_finished({"choices": None}) is False


def test_is_finished_on_a_folded_stream() -> None:
    cut_off = [chunk(choice(0, content="a")), chunk(choice(1, content="b", finish_reason="stop"))]
    assert is_finished(fold_chunks(cut_off)) is False
    assert is_finished(fold_chunks([*cut_off, chunk(choice(0, finish_reason="stop"))])) is True


# -- chunks_of / completion_from_stream --------------------------------------------------------


def test_completion_from_stream_with_include_usage() -> None:
    stream = sse(
        chunk(choice(role="assistant", content=""), system_fingerprint="fp_x"),
        chunk(choice(content="Bonjour, "), system_fingerprint="fp_x"),
        chunk(choice(content="ça va 😀?"), system_fingerprint="fp_x"),
        chunk(choice(finish_reason="stop"), system_fingerprint="fp_x"),
        chunk(usage=USAGE, system_fingerprint="fp_x"),
    )
    completion = completion_from_stream(stream)
    assert completion["choices"][0]["message"]["content"] == "Bonjour, ça va 😀?"
    assert completion["usage"] == USAGE
    assert completion["system_fingerprint"] == "fp_x"
    assert is_finished(completion)


def test_completion_from_stream_with_crlf_and_comments() -> None:
    stream = b": keep-alive\r\n\r\n" + sse(
        chunk(choice(content="a")), chunk(choice(content="b", finish_reason="stop"))
    ).replace(b"\n", b"\r\n")
    completion = completion_from_stream(stream)
    assert completion["choices"][0]["message"]["content"] == "ab"


def test_completion_from_stream_without_done() -> None:
    stream = sse(chunk(choice(content="a", finish_reason="stop")), done=False)
    assert completion_from_stream(stream)["choices"][0]["finish_reason"] == "stop"


def test_completion_from_stream_content_that_looks_like_done() -> None:
    stream = sse(chunk(choice(content="data: [DONE]")), chunk(choice(content="\n\n[DONE]")))
    assert completion_from_stream(stream)["choices"][0]["message"]["content"] == (
        "data: [DONE]\n\n[DONE]"
    )


def test_chunks_of_skips_done_blank_non_json_and_non_objects() -> None:
    first, second = chunk(choice(content="a")), chunk(choice(content="b"))
    stream = (
        b"data: " + orjson.dumps(first) + b"\n\n"
        b"data: not json\n\n"
        b"data: [1, 2]\n\n"
        b'data: "text"\n\n'
        b"data:\n\n"
        b"data:  \n\n"
        b"event: ping\ndata: " + orjson.dumps(second) + b"\n\n"
        b"data: [DONE]\n\n"
    )
    assert list(chunks_of(stream)) == [first, second]


def test_chunks_of_multi_line_data_event() -> None:
    stream = b'data: {"a":\ndata: 1}\n\n'
    assert list(chunks_of(stream)) == [{"a": 1}]


@pytest.mark.parametrize(
    "stream",
    [
        b"",
        b"data: [DONE]\n\n",
        b": only a comment\n\n",
        b"data: garbage\n\n",
        sse(chunk(object="", choices=[])),
        sse(chunk(choice(content="a"), id=None)),
        sse(chunk(choice(content="a"), id=123)),
    ],
    ids=["empty", "only-done", "comment", "garbage", "only-filter", "null-id", "int-id"],
)
def test_completion_from_stream_errors(stream: bytes) -> None:
    with pytest.raises(AssemblyError):
        completion_from_stream(stream)


def test_assembly_error_is_a_value_error() -> None:
    assert issubclass(AssemblyError, ValueError)


# -- completion_from_body --------------------------------------------------------------------


def test_completion_from_body() -> None:
    body = {"id": ID, "object": "chat.completion", "choices": [], "metadata": {"k": "v"}}
    assert completion_from_body(orjson.dumps(body)) == body


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"id": "x"',
        b"[]",
        b'"chatcmpl"',
        b"null",
        b"{}",
        b'{"id": 5, "object": "chat.completion"}',
        b'{"id": null}',
    ],
)
def test_completion_from_body_errors(body: bytes) -> None:
    with pytest.raises(AssemblyError):
        completion_from_body(body)


# -- stored_completion / with_metadata ---------------------------------------------------------

FULL_REQUEST: Json = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hi"}],
    "store": True,
    "metadata": {"topic": "test"},
    "seed": 42,
    "temperature": 0.5,
    "top_p": 0.9,
    "presence_penalty": 0.1,
    "frequency_penalty": -0.2,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "auto",
    "response_format": {"type": "json_object"},
    "service_tier": "flex",
    "user": "user-1234",
}


def plain_completion(**fields: Any) -> Json:
    base: Json = {
        "id": ID,
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi", "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": USAGE,
    }
    return base | fields


def test_stored_completion_echoes_the_request() -> None:
    stored = stored_completion(plain_completion(), FULL_REQUEST, "req_123")
    for key in ECHOED_FIELDS:
        assert stored[key] == FULL_REQUEST[key], key
    assert stored["service_tier"] == "flex"  # the upstream reported none: the request's
    assert stored["input_user"] == "user-1234"
    assert stored["request_id"] == "req_123"
    assert stored["object"] == "chat.completion"
    assert "metadata" not in stored
    assert "user" not in stored
    for key in ("id", "created", "model", "choices", "usage"):
        assert stored[key] == plain_completion()[key]


def test_stored_completion_fields_not_sent_are_null() -> None:
    request = {"model": "gpt-4o-mini", "messages": [], "store": True}
    stored = stored_completion(plain_completion(), request, None)
    expected_null = [*ECHOED_FIELDS, "input_user", "request_id"]
    assert {key: stored[key] for key in expected_null} == dict.fromkeys(expected_null)
    assert "service_tier" not in stored  # absent, not null: the schema types it as a string


def test_stored_completion_echoes_every_contract_field() -> None:
    contract = {
        "seed",
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "tools",
        "tool_choice",
        "response_format",
    }
    assert set(ECHOED_FIELDS) == contract


@pytest.mark.parametrize(
    ("reported", "requested", "stored"),
    [
        ("default", "flex", "default"),
        ("default", None, "default"),
        (None, "flex", "flex"),
        (None, None, None),
    ],
)
def test_stored_completion_service_tier(
    reported: str | None, requested: str | None, stored: str | None
) -> None:
    request = {"service_tier": requested} if requested else {}
    completion = stored_completion(plain_completion(service_tier=reported), request, None)
    assert completion.get("service_tier", "absent") == (stored or "absent")


def test_stored_completion_service_tier_missing_from_the_answer() -> None:
    assert stored_completion(plain_completion(), {"service_tier": "auto"}, None)[
        "service_tier"
    ] == ("auto")


def test_stored_completion_drops_metadata_and_keeps_the_input_intact() -> None:
    completion = plain_completion(metadata={"from": "upstream"}, object="something")
    before = copy.deepcopy(completion)
    stored = stored_completion(completion, FULL_REQUEST, "req")
    assert "metadata" not in stored
    assert stored["object"] == "chat.completion"
    assert completion == before


def test_stored_completion_of_a_folded_stream() -> None:
    folded = completion_from_stream(
        sse(chunk(choice(content="a", finish_reason="stop"), service_tier="default"))
    )
    stored = stored_completion(folded, FULL_REQUEST, "req_9")
    assert stored["service_tier"] == "default"
    assert stored["choices"][0]["message"]["content"] == "a"
    assert stored["seed"] == 42


@pytest.mark.parametrize(
    "metadata",
    [{}, {"topic": "test"}, {"a": "1", "b": 'quote " and \\ backslash', "ü": "😀"}],
)
def test_with_metadata_splices_valid_json(metadata: dict[str, str]) -> None:
    stored = stored_completion(plain_completion(), FULL_REQUEST, "req_1")
    spliced = with_metadata(orjson.dumps(stored), orjson.dumps(metadata))
    assert orjson.loads(spliced) == stored | {"metadata": metadata}
    assert spliced.endswith(b',"metadata":' + orjson.dumps(metadata) + b"}")


def test_with_metadata_keeps_the_stored_bytes() -> None:
    stored = orjson.dumps({"id": "x", "n": 1.5})
    assert with_metadata(stored, b"{}") == b'{"id":"x","n":1.5,"metadata":{}}'


# -- input_messages --------------------------------------------------------------------------


def test_input_messages() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    parts = [{"type": "text", "text": "first"}, image, {"type": "text", "text": "second"}]
    tool_calls = [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ]
    request = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "dev"}]},
            {"role": "user", "content": parts, "name": "alice"},
            {"role": "assistant", "content": None, "tool_calls": tool_calls},
            {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        ],
    }
    assert input_messages(request, ID) == [
        {
            "id": f"{ID}-0",
            "role": "system",
            "content": "Be brief.",
            "name": None,
            "content_parts": None,
        },
        {
            "id": f"{ID}-1",
            "role": "developer",
            "content": "dev",
            "name": None,
            "content_parts": [{"type": "text", "text": "dev"}],
        },
        {
            "id": f"{ID}-2",
            "role": "user",
            "content": "first\nsecond",
            "name": "alice",
            "content_parts": parts,
        },
        {
            "id": f"{ID}-3",
            "role": "assistant",
            "content": None,
            "name": None,
            "content_parts": None,
            "tool_calls": tool_calls,
        },
        {
            "id": f"{ID}-4",
            "role": "tool",
            "content": "42",
            "name": None,
            "content_parts": None,
            "tool_call_id": "call_1",
        },
    ]


@pytest.mark.parametrize(
    ("parts", "content"),
    [
        ([], ""),
        ([{"type": "image_url", "image_url": {"url": "u"}}], ""),
        ([{"type": "text", "text": "a"}], "a"),
        ([{"type": "text", "text": ""}, {"type": "text", "text": "b"}], "\nb"),
        (["not a dict", {"type": "text", "text": 5}, {"type": "text", "text": "c"}], "c"),
    ],
)
def test_input_messages_array_content(parts: list[Any], content: str) -> None:
    (item,) = input_messages({"messages": [{"role": "user", "content": parts}]}, "c")
    assert item["content"] == content
    assert item["content_parts"] == parts


@pytest.mark.parametrize("messages", [5, True, 1.5, "text", {"role": "user"}, None])
def test_input_messages_of_a_request_whose_messages_are_no_list(messages: Any) -> None:
    """A stored request can hold anything an import file or a lenient upstream let through;
    messages that are not a list list nothing rather than failing the endpoint."""
    assert input_messages({"messages": messages}, "c") == []


def test_input_messages_echo_other_fields_only_when_present() -> None:
    audio = {"id": "audio_1"}
    request = {
        "messages": [
            {"role": "assistant", "content": "x", "refusal": None, "audio": audio},
            {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
            {"role": "user", "content": "plain"},
        ]
    }
    first, second, third = input_messages(request, "c")
    assert first["refusal"] is None
    assert first["audio"] == audio
    assert second["function_call"] == {"name": "f", "arguments": "{}"}
    assert second["content"] is None
    assert set(third) == {"id", "role", "content", "name", "content_parts"}


def test_input_messages_ids_keep_the_request_index() -> None:
    request = {
        "messages": [{"role": "user", "content": "a"}, "junk", {"role": "user", "content": "b"}]
    }
    assert [m["id"] for m in input_messages(request, "cmpl")] == ["cmpl-0", "cmpl-2"]


@pytest.mark.parametrize("request_body", [{}, {"messages": None}, {"messages": []}])
def test_input_messages_none(request_body: Json) -> None:
    assert input_messages(request_body, "c") == []


# -- list_body -------------------------------------------------------------------------------


def test_list_body_empty_page() -> None:
    body = orjson.loads(list_body([], has_more=False))
    assert body == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


@pytest.mark.parametrize("has_more", [True, False])
def test_list_body_page(has_more: bool) -> None:
    items = [(f"id-{i}", orjson.dumps({"id": f"id-{i}", "n": i})) for i in range(3)]
    body = orjson.loads(list_body(items, has_more))
    assert body == {
        "object": "list",
        "data": [{"id": "id-0", "n": 0}, {"id": "id-1", "n": 1}, {"id": "id-2", "n": 2}],
        "first_id": "id-0",
        "last_id": "id-2",
        "has_more": has_more,
    }
    assert body["has_more"] is has_more


def test_list_body_single_item_and_ids_that_need_escaping() -> None:
    odd = 'a"b\\c'
    body = orjson.loads(list_body([(odd, b'{"id":"x"}')], has_more=True))
    assert body["first_id"] == body["last_id"] == odd
    assert body["data"] == [{"id": "x"}]
    assert body["has_more"] is True


def test_list_body_of_input_messages() -> None:
    request = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    messages = input_messages(request, "c")
    body = orjson.loads(list_body([(m["id"], orjson.dumps(m)) for m in messages], False))
    assert body["data"] == messages
    assert (body["first_id"], body["last_id"]) == ("c-0", "c-1")
