"""Export and import: round trips, filters, the fine-tuning format, bad files, offline replay."""

from __future__ import annotations

import contextlib
import io
import sqlite3
import time
from pathlib import Path
from typing import cast

import openai
import orjson
import pytest

from proxy.recordings import RUN_BYTES, _runs, parse_run
from proxy.store.sqlite.writes import derive
from tests.fakes import FakeUpstream, Reply
from tests.helpers import ASK, TOOLS, cli, sdk, tool_completion


def lines(data: bytes) -> list[dict]:
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


def count(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM completions").fetchone()[0])


async def record_some(proxy, upstream: FakeUpstream) -> list[str]:
    ids = []
    async with sdk(proxy) as client:
        for n in range(4):
            made = await client.chat.completions.create(
                model="gpt-test" if n % 2 else "gpt-other",
                messages=[
                    {"role": "developer", "content": "be brief"},
                    {"role": "user", "content": f"q{n}"},
                ],
                store=True,
                metadata={"suite": "a" if n < 2 else "b", "n": str(n)},
            )
            ids.append(made.id)
        upstream.script(Reply(json=tool_completion("chatcmpl-tools")))
        made = await client.chat.completions.create(
            model="gpt-test", messages=ASK, tools=TOOLS, store=True
        )
        ids.append(made.id)
        stream = await client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "streamed"}],
            store=True,
            stream=True,
        )
        stream_ids = {chunk.id async for chunk in stream}
        assert len(stream_ids) == 1
        ids.append(stream_ids.pop())
    return ids


async def test_export_import_export_gives_the_same_records(
    proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    ids = await record_some(proxy, upstream)
    source = tmp_path / "completions.db"
    code, exported, err = await cli("export", "--db", str(source))
    assert code == 0, err
    records = lines(exported)
    assert [r["id"] for r in records] == ids
    first = records[0]
    assert set(first) == {
        "id", "caller", "created", "model", "metadata", "request", "response",
        "request_id", "stream", "outcome", "stored_at", "duration_ms",
        "prompt_tokens", "cached_tokens", "completion_tokens",
    }  # fmt: skip
    assert first["caller"].startswith("caller_") and first["outcome"] == "complete"
    assert first["request"]["messages"][1]["content"] == "q0"
    assert records[-1]["stream"] is True
    assert records[-1]["response"]["choices"][0]["message"]["content"] == "echo: streamed"

    dump = tmp_path / "recording.jsonl"
    dump.write_bytes(exported)
    target = tmp_path / "imported.db"
    code, _, err = await cli("import", str(dump), "--db", str(target))
    assert code == 0, err
    assert "imported 6 new completions" in err
    code, again, err = await cli("export", "--db", str(target))
    assert code == 0, err
    assert lines(again) == records
    code, _, err = await cli("import", str(dump), "--db", str(target))  # idempotent by id
    assert code == 0 and "imported 0 new completions (6 already present)" in err
    assert count(target) == 6


async def test_export_filters(proxy, upstream: FakeUpstream, tmp_path: Path) -> None:
    ids = await record_some(proxy, upstream)
    db = str(tmp_path / "completions.db")
    _, out, _ = await cli("export", "--db", db, "--model", "gpt-other")
    assert [r["id"] for r in lines(out)] == [ids[0], ids[2]]
    _, out, _ = await cli("export", "--db", db, "--metadata", "suite=b", "--metadata", "n=3")
    assert [r["id"] for r in lines(out)] == [ids[3]]
    _, out, _ = await cli("export", "--db", db, "--since", "2023-11-14T22:13:21")  # 1700000001
    assert [r["id"] for r in lines(out)] == [ids[4]]
    _, out, _ = await cli("export", "--db", db, "--until", "1700000001")
    assert "chatcmpl-tools" not in [r["id"] for r in lines(out)]
    assert len(lines(out)) == 5
    code, _, err = await cli("export", "--db", db, "--since", "yesterday")
    assert code == 2 and "ISO 8601" in err
    output = tmp_path / "out.jsonl"
    code, out, _ = await cli("export", "--db", db, "-o", str(output))
    assert code == 0 and out == b"" and len(lines(output.read_bytes())) == 6


async def test_finetune_format_line_by_line(proxy, upstream: FakeUpstream, tmp_path: Path) -> None:
    await record_some(proxy, upstream)
    code, out, err = await cli(
        "export", "--db", str(tmp_path / "completions.db"), "--format", "finetune"
    )
    assert code == 0, err
    examples = lines(out)
    assert len(examples) == 6
    for example in examples:
        assert set(example) <= {"messages", "tools", "parallel_tool_calls"}
        messages = example["messages"]
        assert all(m["role"] in {"system", "user", "assistant", "tool"} for m in messages)
        reply = messages[-1]
        assert reply["role"] == "assistant"
        assert isinstance(reply.get("content"), str) or reply.get("tool_calls")
        if "tools" in example:
            assert all(t["type"] == "function" and t["function"]["name"] for t in example["tools"])
    with_tools = [e for e in examples if "tools" in e]
    assert len(with_tools) == 1
    assert [c["function"]["name"] for c in with_tools[0]["messages"][-1]["tool_calls"]] == [
        "weather",
        "weather",
    ]
    assert examples[0]["messages"][0] == {
        "role": "system",
        "content": "be brief",
    }  # developer → system


async def test_bad_import_lines_are_reported_and_nothing_is_written(
    proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    await record_some(proxy, upstream)
    _, exported, _ = await cli("export", "--db", str(tmp_path / "completions.db"))
    good = exported.splitlines()
    broken = dict(orjson.loads(good[3]))
    broken["metadata"] = {"k": 5}
    bad = [
        good[0],
        good[1],
        b"{not json",
        good[2],
        orjson.dumps(broken),
        b"",
        b'{"id": "x"}',
        *good[4:],
    ]
    dump = tmp_path / "bad.jsonl"
    dump.write_bytes(b"\n".join(bad) + b"\n")
    target = tmp_path / "target.db"
    code, _, err = await cli("import", str(dump), "--db", str(target))
    assert code == 1
    reported = [line.split(":")[1] for line in err.splitlines() if line.startswith(str(dump))]
    assert reported == ["3", "5", "7"]
    assert "nothing was imported" in err
    assert count(target) == 0
    code, _, err = await cli("import", str(tmp_path / "absent.jsonl"), "--db", str(target))
    assert code == 1 and "No such file" in err


async def test_import_from_stdin(proxy, upstream: FakeUpstream, tmp_path: Path) -> None:
    await record_some(proxy, upstream)
    _, exported, _ = await cli("export", "--db", str(tmp_path / "completions.db"))
    code, _, err = await cli("import", "-", "--db", str(tmp_path / "piped.db"), stdin=exported)
    assert code == 0, err
    assert count(tmp_path / "piped.db") == 6


async def test_a_committed_recording_file_replays_offline(
    proxy_factory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """docs/replay.md's recipe: a recording file next to the tests, imported, replayed strictly."""
    recorder = await proxy_factory(store={"url": str(tmp_path / "record.db")})
    async with sdk(recorder, "sk-ci-recorder") as client:
        original = await client.chat.completions.create(model="gpt-test", messages=ASK, store=True)
    _, exported, _ = await cli("export", "--db", str(tmp_path / "record.db"))
    (tmp_path / "recording.jsonl").write_bytes(exported)
    await upstream.server.close()  # type: ignore[attr-defined]
    code, _, err = await cli(
        "import", str(tmp_path / "recording.jsonl"), "--db", str(tmp_path / "replay.db")
    )
    assert code == 0, err
    offline = await proxy_factory(
        store={"url": str(tmp_path / "replay.db")}, replay={"mode": "strict", "shared": True}
    )
    async with sdk(offline, "sk-any-throwaway-key") as client:
        replayed = await client.chat.completions.create(model="gpt-test", messages=ASK, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in replayed if c.choices])
        assert text == original.choices[0].message.content
        try:
            await client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "new"}]
            )
        except openai.BadRequestError as error:
            assert error.code == "replay_miss"
        else:
            raise AssertionError("a request never recorded must miss")


def test_a_file_is_cut_into_runs_of_whole_lines_numbered_from_one() -> None:
    lines = [b"a" * 5, b"b" * 30, b"", b"c" * 3, b"d\r", b"e" * 12]  # one longer than a run
    runs = list(_runs(io.BytesIO(b"\n".join(lines)), size=10))  # no newline at the end
    assert b"".join(run for _, run in runs) == b"\n".join(lines)
    assert all(run.endswith(b"\n") for _, run in runs[:-1])
    numbered = [
        (number, line)
        for first, run in runs
        for number, line in enumerate(run.split(b"\n"), first)
        if line
    ]
    assert numbered == [(n, line) for n, line in enumerate(lines, 1) if line]
    assert list(_runs(io.BytesIO(b""))) == []


def test_a_run_reports_bad_lines_by_their_number_in_the_file() -> None:
    good = orjson.dumps(
        {
            "id": "chatcmpl-1",
            "caller": "c",
            "created": 1,
            "model": "m",
            "request": {},
            "response": {"id": "chatcmpl-1"},
        }
    )
    run = b"\n".join([good, b"{", b"", good, b'{"id": 2}']) + b"\n"
    rows, errors, bad = parse_run(41, run, derive)
    assert len(rows) == 2 and bad == 2
    assert [number for number, _ in errors] == [42, 45]
    assert rows[0].derived == derive(rows[0].record)  # prepared for the store's writer


def test_a_line_without_stored_at_is_stored_at_import_time() -> None:
    line = {"caller": "c", "created": 1, "model": "m", "request": {}, "response": {}}
    old = orjson.dumps({**line, "id": "chatcmpl-old", "stored_at": 1_700_000_000.5})
    new = orjson.dumps({**line, "id": "chatcmpl-new"})
    before = time.time()
    rows, _, bad = parse_run(1, old + b"\n" + new + b"\n", derive)
    assert bad == 0
    assert rows[0].record.stored_at == 1_700_000_000.5
    assert before <= cast(float, rows[1].record.stored_at) <= time.time()


async def test_a_large_import_is_parsed_beside_the_inserts_and_checked_whole(
    proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """More than one run of lines: the parser processes take part, line numbers stay right
    across runs, and a bad line near the end still leaves nothing written."""
    await record_some(proxy, upstream)
    _, exported, _ = await cli("export", "--db", str(tmp_path / "completions.db"))
    template = orjson.loads(exported.splitlines()[0])
    many = []
    for n in range(5_000):
        line = dict(template, id=f"chatcmpl-many-{n}")
        line["response"] = dict(template["response"], id=line["id"])
        many.append(orjson.dumps(line))
    dump = tmp_path / "many.jsonl"
    dump.write_bytes(b"\n".join([*many[:4_499], b'{"id": 1}', *many[4_499:]]) + b"\n")
    assert dump.stat().st_size > 3 * RUN_BYTES
    target = tmp_path / "many.db"
    code, _, err = await cli("import", str(dump), "--db", str(target))
    assert code == 1
    assert [line.split(":")[1] for line in err.splitlines() if line.startswith(str(dump))] == [
        "4500"
    ]
    assert count(target) == 0

    dump.write_bytes(b"\n".join(many) + b"\n")
    code, _, err = await cli("import", str(dump), "--db", str(target))
    assert code == 0, err
    assert "imported 5000 new completions" in err
    _, again, _ = await cli("export", "--db", str(target))
    assert [orjson.loads(line)["id"] for line in again.splitlines()] == [
        f"chatcmpl-many-{n}" for n in range(5_000)
    ]


def stored_rows(db: Path) -> tuple[list[tuple], list[tuple]]:
    """Every column of every completion and metadata pair but the seq (each store gives
    its own), in the order they were stored."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(completions)")]
        kept = ", ".join(c for c in columns if c != "seq")
        completions = conn.execute(f"SELECT {kept} FROM completions ORDER BY seq").fetchall()
        pairs = conn.execute(
            "SELECT c.caller, c.id, m.key, m.value, m.created FROM completion_metadata m"
            " JOIN completions c ON c.seq = m.seq ORDER BY c.seq, m.key"
        ).fetchall()
    return completions, pairs


async def test_export_then_import_keeps_whole_rows_and_usage(
    proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Token counts (what usage and cost are summed from) travel with the rest of the row."""
    await record_some(proxy, upstream)
    source, target = tmp_path / "completions.db", tmp_path / "imported.db"
    _, exported, _ = await cli("export", "--db", str(source))
    dump = tmp_path / "dump.jsonl"
    dump.write_bytes(exported)
    code, _, err = await cli("import", str(dump), "--db", str(target))
    assert code == 0, err
    original, imported = stored_rows(source), stored_rows(target)
    assert len(original[0]) == 6 and len(original[1]) == 8
    assert imported == original
    usages = []
    for db in (source, target):
        code, out, err = await cli("usage", "--db", str(db), "--json", "--group-by", "caller,model")
        assert code == 0, err
        usages.append(orjson.loads(out))
    assert usages[0] == usages[1]
    assert sum(row["prompt_tokens"] + row["completion_tokens"] for row in usages[1]) > 0


async def test_an_export_without_token_counts_takes_them_from_the_usage(
    proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A file written before token counts were exported: they come from response.usage."""
    await record_some(proxy, upstream)
    _, exported, _ = await cli("export", "--db", str(tmp_path / "completions.db"))
    old = [{k: v for k, v in line.items() if not k.endswith("_tokens")} for line in lines(exported)]
    dump = tmp_path / "old.jsonl"
    dump.write_bytes(b"\n".join(map(orjson.dumps, old)) + b"\n")
    code, _, err = await cli("import", str(dump), "--db", str(tmp_path / "imported.db"))
    assert code == 0, err
    assert stored_rows(tmp_path / "imported.db") == stored_rows(tmp_path / "completions.db")


@pytest.mark.parametrize(
    "command",
    [
        ("export",),
        ("usage",),
        ("keys", "list"),
        ("keys", "revoke", "bob"),
        ("prune", "--days", "1"),
    ],
    ids=" ".join,
)
async def test_a_command_that_needs_a_store_refuses_one_that_does_not_exist(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    absent = tmp_path / "nowhere" / "absent.db"
    code, out, err = await cli(*command, "--db", str(absent))
    assert code == 1
    assert out == b""
    assert err == f"completions-proxy: no database at {absent}\n"
    assert not absent.parent.exists()


async def test_every_store_command_opens_the_store_the_config_names(
    proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """--config alone: keys, export, import, usage and prune use the config's store.url,
    the file serve uses, not ./completions.db."""
    await record_some(proxy, upstream)
    source = tmp_path / "completions.db"
    config = tmp_path / "proxy.yaml"
    config.write_text(f"store:\n  url: {source}\n", encoding="utf-8")
    code, _, err = await cli("keys", "create", "carol", "--config", str(config))
    assert code == 0, err
    code, out, err = await cli("keys", "list", "--config", str(config))
    assert code == 0 and b"carol" in out, err
    code, exported, err = await cli("export", "--config", str(config))
    assert code == 0 and len(lines(exported)) == 6, err
    code, out, err = await cli("usage", "--config", str(config), "--json")
    assert code == 0 and sum(row["completions"] for row in orjson.loads(out)) == 6, err
    other = tmp_path / "other.yaml"
    other.write_text(f"store:\n  path: {tmp_path / 'copy.db'}\n", encoding="utf-8")  # old name
    code, _, err = await cli("import", "-", "--config", str(other), stdin=exported)
    assert code == 0, err
    assert count(tmp_path / "copy.db") == 6
    code, _, err = await cli("prune", "--config", str(other), "--days", "100000")
    assert code == 0 and err.startswith("pruned 0 completions"), err
    assert count(tmp_path / "copy.db") == 6
    assert not (Path.cwd() / "completions.db").exists()
