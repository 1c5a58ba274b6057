"""The pytest plugin, run by pytest on small generated projects (pytester).

Each project's tests call the official SDK with no base URL of their own; the plugin points
them at its proxy. Recording goes to a real fake upstream served on a loopback port; replay
runs with that upstream stopped.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from proxy.identity import essential, request_key
from proxy.testing.files import Exchange, RecordingFileError, file_name, read, write
from proxy.testing.mismatch import closest, differences
from tests.fakes import FakeUpstream, Reply, sse
from tests.helpers import tool_completion

pytest_plugins = ["pytester"]

# In-process runs share this process, where the package is already imported: pytest says it
# cannot rewrite its asserts (a fresh process marks it before importing it, and says nothing).
INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings =
    error
    ignore:Module already imported so cannot be rewritten:pytest.PytestAssertRewriteWarning
"""

TESTS = """
import json, os
import openai
import pytest

QUESTION = [{"role": "user", "content": "hello"}]


def note(name, *ids):
    with open(os.environ["PLUGIN_TEST_NOTES"], "a") as notes:
        notes.write(json.dumps([name, *ids]) + "\\n")


@pytest.mark.completions
def test_sync_plain():
    client = openai.OpenAI()
    first = client.chat.completions.create(model="gpt-test", messages=QUESTION)
    second = client.chat.completions.create(model="gpt-test", messages=QUESTION)
    assert first.choices[0].message.content == "echo: hello"
    assert first.id != second.id  # two recordings of one request play in order
    note("sync_plain", first.id, second.id)


@pytest.mark.completions
async def test_async_stream():
    async with openai.AsyncOpenAI() as client:
        stream = await client.chat.completions.create(
            model="gpt-test", messages=QUESTION, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello"
    assert chunks[-1].usage.total_tokens == 12
    note("async_stream", chunks[0].id)


def test_fixture_with_a_client_built_by_hand(completions_proxy):
    client = openai.OpenAI(base_url=completions_proxy, api_key="sk-anything")
    answer = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "by hand"}], n=2
    )
    assert [c.message.content for c in answer.choices] == ["echo: by hand"] * 2
    note("by_hand", answer.id)
"""


class UpstreamThread:
    """The fake upstream served on a loopback port from its own thread and loop."""

    def __init__(self) -> None:
        self.fake = FakeUpstream()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner = web.AppRunner(self.fake.app)
        self.url = ""

    async def _start(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}/v1"

    def start(self) -> None:
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def chat_calls(self) -> int:
        return len(self.fake.chat_requests())


@pytest.fixture
def upstream_thread() -> Iterator[UpstreamThread]:
    server = UpstreamThread()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makeini(INI)
    pytester.makepyfile(test_chat=TESTS)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-recorder-secret-token")
    monkeypatch.setenv("PLUGIN_TEST_NOTES", str(pytester.path / "notes.jsonl"))
    return pytester


def record(project: pytest.Pytester, upstream: UpstreamThread, *args: str) -> None:
    result = project.runpytest_inprocess(
        "--completions-mode=record", f"--completions-upstream={upstream.url}", *args
    )
    assert result.ret == 0, result.stdout.str()


def recording(project: pytest.Pytester, test: str) -> Path:
    return project.path / "recordings" / "test_chat" / f"{test}.jsonl"


def notes(project: pytest.Pytester) -> dict[str, list[str]]:
    path = project.path / "notes.jsonl"
    found = {}
    for line in path.read_text().splitlines():
        name, *ids = orjson.loads(line)
        found[name] = ids
    path.unlink()
    return found


def test_record_then_replay_offline(
    project: pytest.Pytester, upstream_thread: UpstreamThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    record(project, upstream_thread)
    assert upstream_thread.chat_calls() == 4
    recorded = notes(project)
    lines = recording(project, "test_sync_plain").read_bytes().splitlines()
    assert len(lines) == 2
    first = orjson.loads(lines[0])
    assert list(first) == ["key", "request", "response"]
    assert first["request"] == {
        "messages": [{"content": "hello", "role": "user"}],
        "model": "gpt-test",
    }
    assert first["response"]["id"] == recorded["sync_plain"][0]
    assert "request_id" not in first["response"] and "caller" not in first
    streamed = orjson.loads(recording(project, "test_async_stream").read_bytes())
    assert streamed["request"]["stream"] is True
    assert streamed["response"]["object"] == "chat.completion"  # folded
    for path in (project.path / "recordings").rglob("*"):
        if path.is_file():
            assert b"sk-recorder-secret-token" not in path.read_bytes()

    upstream_thread.stop()
    monkeypatch.delenv("OPENAI_API_KEY")  # CI without a key
    result = project.runpytest_inprocess()
    result.assert_outcomes(passed=3)
    assert notes(project) == recorded


def test_a_request_with_no_recording_fails_the_test_and_says_why(
    project: pytest.Pytester, upstream_thread: UpstreamThread
) -> None:
    record(project, upstream_thread, "test_chat.py::test_sync_plain")
    upstream_thread.stop()
    project.makepyfile(test_chat=TESTS.replace('"content": "hello"', '"content": "hullo"'))
    result = project.runpytest_inprocess("test_chat.py::test_sync_plain")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "test_chat.py::test_sync_plain sent a chat completion request (model 'gpt-test')" in text
    assert "Closest recording: recordings/test_chat/test_sync_plain.jsonl, line 1" in text
    assert "first difference at messages[0].content: recorded 'hello', sent 'hullo'" in text
    assert "pytest --completions-mode=record 'test_chat.py::test_sync_plain'" in text
    # A renamed test has no recordings of its own: the closest is found in its module's.
    project.makepyfile(test_chat=TESTS.replace("def test_sync_plain", "def test_renamed"))
    result = project.runpytest_inprocess("test_chat.py::test_renamed")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "This test has no recordings (recordings/test_chat/test_renamed.jsonl does not" in text
    assert (
        "The same request is recorded for another test: recordings/test_chat/test_sync_plain.jsonl"
        in text
    )
    assert "During handling" not in text  # the misses alone, not the SDK's error before them
    # A test that catches the error still fails; a test never recorded says so.
    project.makepyfile(
        test_caught="""
import openai, pytest

@pytest.mark.completions
def test_swallows_the_error():
    try:
        openai.OpenAI().chat.completions.create(model="gpt-4o", messages=[])
    except openai.BadRequestError as error:
        assert error.code == "replay_miss"
"""
    )
    result = project.runpytest_inprocess("test_caught.py")
    result.assert_outcomes(failed=1)
    assert "recordings/test_caught/test_swallows_the_error.jsonl does not exist" in (
        result.stdout.str()
    )


TOOL_TEST = """
import openai, pytest

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


@pytest.mark.completions
def test_weather():
    client = openai.OpenAI()
    ASK
    message = final.choices[0].message
    calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls]
    assert calls == [("call_a", "weather", '{"city":'), ("call_b", "weather", '{"city": "Lyon"}')]
    assert final.choices[0].finish_reason == "tool_calls" and final.usage.total_tokens == 13
"""
PLAIN = """final = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS
    )"""
STREAMED = """with client.chat.completions.stream(
        model="gpt-test",
        messages=[{"role": "user", "content": "weather?"}],
        tools=TOOLS,
        stream_options={"include_usage": True},
    ) as stream:
        final = stream.get_final_completion()"""


def streamed_tool_calls(completion_id: str) -> list[dict]:
    """``tool_completion``'s answer as an upstream streams it, arguments cut mid-token."""
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def delta(d: dict, finish: str | None = None) -> dict:
        return {**base, "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}

    def call(index: int, arguments: str, **first: str) -> dict:
        named = {"id": first["id"], "type": "function"} if first else {}
        function = (
            {"name": "weather", "arguments": arguments} if first else {"arguments": arguments}
        )
        return delta({"tool_calls": [{"index": index, **named, "function": function}]})

    return [
        delta({"role": "assistant", "content": None}),
        call(0, "", id="call_a"),
        call(0, '{"city":'),
        call(1, '{"city": ', id="call_b"),
        call(1, '"Lyon"}'),
        delta({}, "tool_calls"),
        {
            **base,
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
        },
    ]


def test_a_plain_recording_replays_to_a_streaming_test(
    project: pytest.Pytester, upstream_thread: UpstreamThread
) -> None:
    """Tool calls and the usage chunk included; then the other way round."""
    upstream_thread.fake.script(Reply(json=tool_completion("chatcmpl-tools")))
    project.makepyfile(test_chat=TOOL_TEST.replace("ASK", PLAIN))
    record(project, upstream_thread, "test_chat.py::test_weather")
    assert "stream" not in orjson.loads(recording(project, "test_weather").read_bytes())["request"]
    project.makepyfile(test_chat=TOOL_TEST.replace("ASK", STREAMED))
    project.runpytest_inprocess().assert_outcomes(passed=1)

    upstream_thread.fake.script(Reply(sse=sse(streamed_tool_calls("chatcmpl-streamed"))))
    record(project, upstream_thread, "test_chat.py::test_weather")
    assert orjson.loads(recording(project, "test_weather").read_bytes())["request"]["stream"]
    upstream_thread.stop()
    project.makepyfile(test_chat=TOOL_TEST.replace("ASK", PLAIN))
    project.runpytest_inprocess().assert_outcomes(passed=1)


def test_re_recording_one_test_rewrites_only_its_file(
    project: pytest.Pytester, upstream_thread: UpstreamThread
) -> None:
    record(project, upstream_thread)
    before = {
        name: recording(project, name).read_bytes()
        for name in (
            "test_sync_plain",
            "test_async_stream",
            "test_fixture_with_a_client_built_by_hand",
        )
    }
    record(project, upstream_thread, "test_chat.py::test_async_stream")
    assert recording(project, "test_async_stream").read_bytes() != before["test_async_stream"]
    for name in ("test_sync_plain", "test_fixture_with_a_client_built_by_hand"):
        assert recording(project, name).read_bytes() == before[name]
    # Replaying the same recordings again and again changes nothing.
    upstream_thread.stop()
    project.runpytest_inprocess("--completions-mode=fallback").assert_outcomes(passed=3)
    assert recording(project, "test_sync_plain").read_bytes() == before["test_sync_plain"]


def test_same_answers_alone_in_any_order_and_under_xdist(
    project: pytest.Pytester, upstream_thread: UpstreamThread
) -> None:
    record(project, upstream_thread)
    recorded = notes(project)
    upstream_thread.stop()
    names = ["test_sync_plain", "test_async_stream", "test_fixture_with_a_client_built_by_hand"]
    project.runpytest_inprocess(*[f"test_chat.py::{n}" for n in reversed(names)]).assert_outcomes(
        passed=3
    )
    assert notes(project) == recorded
    for name in names:
        project.runpytest_inprocess(f"test_chat.py::{name}").assert_outcomes(passed=1)
    assert notes(project) == recorded
    # Two workers; plugins this project does not use stay unloaded, so they start faster.
    result = project.runpytest_subprocess(
        "-n", "2", "-p", "xdist", "-p", "no:schemathesis", "-p", "no:hypothesispytest"
    )
    result.assert_outcomes(passed=3)
    assert notes(project) == recorded


def test_mode_off_leaves_the_client_alone(
    project: pytest.Pytester, upstream_thread: UpstreamThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", upstream_thread.url)
    result = project.runpytest_inprocess("--completions-mode=off")
    result.assert_outcomes(passed=3)
    assert upstream_thread.chat_calls() == 4
    assert not (project.path / "recordings").exists()


def test_installed_but_unused_the_plugin_changes_nothing(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        """
import os

def test_plain():
    assert "OPENAI_BASE_URL" not in os.environ or os.environ["OPENAI_BASE_URL"] == "untouched"
"""
    )
    monkeypatch.setenv("OPENAI_BASE_URL", "untouched")
    result = pytester.runpytest_inprocess("--fixtures")
    assert "completions_proxy" in result.stdout.str()
    pytester.runpytest_inprocess().assert_outcomes(passed=1)
    assert not (pytester.path / "recordings").exists()


def test_secrets_in_a_prompt_are_redacted_and_the_test_still_replays(
    project: pytest.Pytester, upstream_thread: UpstreamThread
) -> None:
    project.makepyfile(
        test_chat="""
import openai, pytest

@pytest.mark.completions
def test_mail():
    with openai.OpenAI() as client:
        answer = client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "write to ada@example.com, key sk-proj-%s"}],
        )
    assert answer.choices[0].message.content.startswith("echo: write to")
"""
        % ("x" * 30)
    )
    record(project, upstream_thread, "test_chat.py::test_mail")
    text = recording(project, "test_mail").read_text()
    assert "ada@example.com" not in text and "x" * 30 not in text
    assert "[REDACTED:email]" in text
    assert orjson.loads(text)["key"].startswith("v1:")
    upstream_thread.stop()
    project.runpytest_inprocess().assert_outcomes(passed=1)


def test_an_edited_recording_is_matched_on_its_request() -> None:
    plain = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    stale = request_key({"model": "old"})
    assert Exchange(plain, {"id": "x"}, stale).replay_key() == request_key(plain)
    redacted = {"model": "m", "messages": [{"role": "user", "content": "[REDACTED:email]"}]}
    assert Exchange(redacted, {"id": "x"}, stale).replay_key() == stale


def test_the_first_difference_is_found_in_key_order() -> None:
    recorded = {"model": "m", "messages": [{"role": "user", "content": "a"}], "temperature": 1.0}
    sent = {"model": "m", "messages": [{"role": "user", "content": "b"}], "temperature": 1}
    assert [str(d) for d in differences(essential(recorded), essential(sent))] == [
        "messages[0].content: recorded 'a', sent 'b'"
    ]
    sent_more = {**sent, "messages": [*sent["messages"], {"role": "user", "content": "c"}]}
    found = list(differences(essential(recorded), essential(sent_more)))
    assert [d.path for d in found] == ["messages[0].content", "messages[1]"]
    assert str(found[1]).startswith("messages[1]: recorded (absent), sent {")
    long = differences(
        "You are a careful assistant. Answer in French.",
        "You are a careful assistant. Answer in German.",
    )
    assert [str(d) for d in long] == [
        "(the request) (from character 19): recorded '...ssistant. Answer in French.',"
        " sent '...ssistant. Answer in German.'"
    ]


def test_the_closest_recording_has_the_fewest_differences() -> None:
    sent = {"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 2}
    recorded = [
        {"model": "n", "messages": [{"role": "user", "content": "y"}], "seed": 2},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 1},
    ]
    near = closest(recorded, sent)
    assert near is not None and near.first is not None
    assert (near.index, near.count, near.first.path) == (1, 1, "seed")
    same = closest([*recorded, {**sent, "stream": True}], sent)
    assert same is not None and (same.index, same.count, same.first) == (2, 0, None)
    assert closest([], sent) is None


def test_recording_file_names_are_safe_and_unique() -> None:
    assert file_name("TestA.test_b[gpt-4o/mini]") == "TestA.test_b[gpt-4o_mini].jsonl"
    long = file_name("test_" + "x" * 300)
    assert len(long) <= 126 and long != file_name("test_" + "x" * 301)


def test_a_bad_recording_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"request": {}, "response": {"id": "a"}}\n{"request": 1}\n')
    with pytest.raises(RecordingFileError, match=r"t.jsonl:2: expected an object"):
        read(path)


def test_a_marked_module_with_classes_and_parameters(
    project: pytest.Pytester, upstream_thread: UpstreamThread
) -> None:
    project.makepyfile(
        test_chat="""
import openai, pytest

pytestmark = pytest.mark.completions


class TestModels:
    @pytest.mark.parametrize("model", ["gpt-a", "gpt-b/mini"])
    async def test_each(self, model):
        async with openai.AsyncOpenAI() as client:
            answer = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": model}]
            )
        assert answer.choices[0].message.content == "echo: " + model
"""
    )
    record(project, upstream_thread, "test_chat.py")
    folder = project.path / "recordings" / "test_chat"
    assert sorted(p.name for p in folder.iterdir()) == [
        "TestModels.test_each[gpt-a].jsonl",
        "TestModels.test_each[gpt-b_mini].jsonl",
    ]
    upstream_thread.stop()
    project.runpytest_inprocess().assert_outcomes(passed=2)


def test_a_file_orders_lines_by_key_whatever_order_they_came_in(tmp_path: Path) -> None:
    def exchange(text: str, answer: str) -> Exchange:
        request = {"model": "m", "messages": [{"role": "user", "content": text}]}
        return Exchange(request, {"id": answer}, request_key(request))

    made = [exchange("a", "1"), exchange("b", "2"), exchange("a", "3"), exchange("c", "4")]
    one, other = tmp_path / "one.jsonl", tmp_path / "other.jsonl"
    write(one, made)
    write(other, [made[3], made[1], made[0], made[2]])  # as concurrent requests may finish
    assert one.read_bytes() == other.read_bytes()
    answers = [e.response["id"] for e in read(one)]
    assert answers.index("1") < answers.index("3")  # one request's recordings keep their order
    assert [e.key for e in read(one)] == sorted(e.key for e in made)
    write(one, [])
    assert not one.exists()


def test_fallback_records_only_what_is_missing(
    project: pytest.Pytester, upstream_thread: UpstreamThread
) -> None:
    record(project, upstream_thread, "test_chat.py::test_sync_plain")
    before = recording(project, "test_sync_plain").read_bytes().splitlines()
    calls = upstream_thread.chat_calls()
    extra = """
    third = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "one more"}]
    )
    assert third.choices[0].message.content == "echo: one more"
    note("sync_plain", first.id, second.id)"""
    project.makepyfile(
        test_chat=TESTS.replace('\n    note("sync_plain", first.id, second.id)', extra, 1)
    )
    result = project.runpytest_inprocess(
        "--completions-mode=fallback",
        f"--completions-upstream={upstream_thread.url}",
        "test_chat.py::test_sync_plain",
    )
    result.assert_outcomes(passed=1)
    assert upstream_thread.chat_calls() == calls + 1  # only the new request went upstream
    after = recording(project, "test_sync_plain").read_bytes().splitlines()
    assert len(after) == 3 and set(before) <= set(after)
    upstream_thread.stop()
    project.runpytest_inprocess("test_chat.py::test_sync_plain").assert_outcomes(passed=1)


def test_a_broken_record_run_keeps_the_recording(
    project: pytest.Pytester, upstream_thread: UpstreamThread
) -> None:
    record(project, upstream_thread, "test_chat.py::test_sync_plain")
    before = recording(project, "test_sync_plain").read_bytes()
    project.makeconftest(
        """
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("a fixture of the test fails before it asks anything")
"""
    )
    project.makepyfile(
        test_chat=TESTS.replace("def test_sync_plain():", "def test_sync_plain(broken):")
    )
    result = project.runpytest_inprocess(
        "--completions-mode=record",
        f"--completions-upstream={upstream_thread.url}",
        "test_chat.py::test_sync_plain",
    )
    result.assert_outcomes(errors=1)
    assert recording(project, "test_sync_plain").read_bytes() == before
