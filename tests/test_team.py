"""Team audit log: proxy keys and roles, capture policy, audit trail, redaction, usage, metrics."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.keys import WRITER
from tests.fakes import FakeUpstream, Reply, chunks, sse, tool_call_answer
from tests.helpers import cli, sdk

UPSTREAM_KEY = "sk-upstream-team-secret-0123456789abcdef"
PRICES = {"gpt-test": {"input": 1.0, "cached_input": 0.5, "output": 2.0}}


@pytest.fixture
async def team(proxy_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A keys-mode proxy with two members and an admin: the admin made by the CLI, the
    members by the admin through ``POST /admin/keys`` (a process less per key)."""
    monkeypatch.setenv("OPENAI_API_KEY", UPSTREAM_KEY)
    db = str(tmp_path / "completions.db")
    code, out, err = await cli("keys", "create", "root", "--role", "admin", "--db", db)
    assert code == 0, err
    keys = {"root": out.decode().strip()}
    proxy = await proxy_factory(auth={"mode": "keys", "key_cache_seconds": 0}, prices=PRICES)
    for name in ("alice", "bob"):
        made = await proxy.post(
            "/admin/keys",
            json={"name": name, "role": "member"},
            headers={"Authorization": f"Bearer {keys['root']}"},
        )
        assert made.status == 200, await made.text()
        keys[name] = (await made.json())["key"]
    return proxy, keys


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def test_proxy_keys_replace_the_upstream_key(
    team, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy, keys = team
    async with sdk(proxy, keys["alice"]) as alice:
        made = await alice.chat.completions.create(model="gpt-test", messages=ask("hi"), store=True)
        await alice.models.list()
    raw = await proxy.post(
        "/v1/chat/completions",
        json={"model": "gpt-test", "messages": ask("raw"), "store": True},
        headers={"Authorization": f"Bearer {keys['alice']}"},
    )
    assert UPSTREAM_KEY not in str(raw.headers) and UPSTREAM_KEY not in await raw.text()
    for received in upstream.received:
        assert received.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert keys["alice"] not in str(received.headers)
    with sqlite3.connect(tmp_path / "completions.db") as db:
        row = db.execute("SELECT caller FROM completions WHERE id = ?", (made.id,)).fetchone()
    assert row == ("alice",)
    stored = b"".join(
        p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("completions.db")
    )
    assert UPSTREAM_KEY.encode() not in stored
    assert keys["alice"].encode() not in stored
    assert keys["alice"].split("_", 2)[2].encode() not in stored  # only a hash of the secret


@pytest.mark.parametrize("token", ["sk-not-a-proxy-key", "cpk_000000000000_wrong", "cpk_malformed"])
async def test_unknown_keys_are_401_without_calling_upstream(
    team, upstream: FakeUpstream, token: str
) -> None:
    proxy, keys = team
    async with sdk(proxy, token) as stranger:
        with pytest.raises(openai.AuthenticationError):
            await stranger.chat.completions.create(model="gpt-test", messages=ask("hi"))
        with pytest.raises(openai.AuthenticationError):
            await stranger.models.list()
        with pytest.raises(openai.AuthenticationError):
            await stranger.chat.completions.list()
    forged = keys["alice"][:-4] + "AAAA"
    async with sdk(proxy, forged) as forger:
        with pytest.raises(openai.AuthenticationError):
            await forger.chat.completions.create(model="gpt-test", messages=ask("hi"))
    assert upstream.received == []


async def test_revoked_key_stops_working(team, upstream: FakeUpstream, tmp_path: Path) -> None:
    proxy, keys = team
    async with sdk(proxy, keys["bob"]) as bob:
        await bob.chat.completions.create(model="gpt-test", messages=ask("before"))
        code, _, err = await cli("keys", "revoke", "bob", "--db", str(tmp_path / "completions.db"))
        assert code == 0, err
        calls = len(upstream.received)
        with pytest.raises(openai.AuthenticationError) as caught:
            await bob.chat.completions.create(model="gpt-test", messages=ask("after"))
        assert "revoked" in caught.value.message
        assert len(upstream.received) == calls
    code, out, _ = await cli("keys", "list", "--db", str(tmp_path / "completions.db"))
    listing = out.decode()
    assert "bob" in listing and keys["bob"].split("_", 2)[2] not in listing


async def test_members_see_their_own_and_admins_see_everyone(team) -> None:
    proxy, keys = team
    ids = {}
    for name in ("alice", "bob"):
        async with sdk(proxy, keys[name]) as client:
            made = await client.chat.completions.create(
                model="gpt-test", messages=ask(name), store=True, metadata={"team": "x"}
            )
            ids[name] = made.id
    async with sdk(proxy, keys["alice"]) as alice:
        assert [c.id for c in (await alice.chat.completions.list()).data] == [ids["alice"]]
        with pytest.raises(openai.NotFoundError):
            await alice.chat.completions.retrieve(ids["bob"])
        with pytest.raises(openai.PermissionDeniedError):
            await alice.chat.completions.list(extra_query={"caller": "bob"})
        with pytest.raises(openai.PermissionDeniedError):
            await alice.get("/../admin/usage", cast_to=object)
    async with sdk(proxy, keys["root"]) as root:
        everyone = [c.id async for c in root.chat.completions.list(metadata={"team": "x"})]
        assert everyone == [ids["alice"], ids["bob"]]
        only_bob = await root.chat.completions.list(extra_query={"caller": "bob"})
        assert [c.id for c in only_bob.data] == [ids["bob"]]
        assert (await root.chat.completions.retrieve(ids["alice"])).id == ids["alice"]
        updated = await root.chat.completions.update(ids["bob"], metadata={"reviewed": "yes"})
        assert updated.metadata == {"reviewed": "yes"}
        assert (await root.chat.completions.messages.list(ids["alice"])).data[0].content == "alice"
        await root.chat.completions.delete(ids["alice"])
    async with sdk(proxy, keys["alice"]) as alice:
        assert (await alice.chat.completions.list()).data == []


async def test_audit_trail_records_who_changed_what(team, tmp_path: Path) -> None:
    proxy, keys = team
    async with sdk(proxy, keys["alice"]) as alice:
        made = await alice.chat.completions.create(
            model="gpt-test", messages=ask("x"), store=True, metadata={"a": "1"}
        )
        await alice.chat.completions.update(made.id, metadata={"a": "2"})
    async with sdk(proxy, keys["root"]) as root:
        await root.chat.completions.delete(made.id)
    response = await proxy.get("/admin/audit", headers={"Authorization": f"Bearer {keys['root']}"})
    assert response.status == 200
    entries = [e for e in (await response.json())["data"] if e["completion_id"] == made.id]
    assert [(e["action"], e["actor"], e["owner"]) for e in entries] == [
        ("update_metadata", "alice", "alice"),
        ("delete", "root", "alice"),
    ]
    assert entries[0]["detail"] == {"before": {"a": "1"}, "after": {"a": "2"}}
    assert entries[1]["detail"] == {"metadata": {"a": "2"}, "content_purged": True}
    member = await proxy.get("/admin/audit", headers={"Authorization": f"Bearer {keys['alice']}"})
    assert member.status == 403
    with sqlite3.connect(tmp_path / "completions.db") as db:
        for statement in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(statement)
        assert db.execute("SELECT count(*) FROM deleted_completions").fetchone()[0] == 0


async def test_deletes_can_keep_content_hidden(proxy_factory, tmp_path: Path) -> None:
    proxy = await proxy_factory(audit={"delete_purges": False})
    async with sdk(proxy) as client:
        made = await client.chat.completions.create(
            model="gpt-test", messages=ask("keep me"), store=True
        )
        await client.chat.completions.delete(made.id)
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.retrieve(made.id)
    with sqlite3.connect(tmp_path / "completions.db") as db:
        row = db.execute("SELECT id, deleted_by FROM deleted_completions").fetchone()
    assert row[0] == made.id and row[1].startswith("caller_")


async def test_capture_all_and_failed_exchanges(
    proxy_factory, upstream: FakeUpstream, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", UPSTREAM_KEY)
    db = str(tmp_path / "completions.db")
    code, out, err = await cli("keys", "create", "root", "--role", "admin", "--db", db)
    assert code == 0, err
    root_key = out.decode().strip()
    proxy = await proxy_factory(auth={"mode": "keys"}, capture={"policy": "all"})
    async with sdk(proxy, root_key) as client:
        kept = await client.chat.completions.create(model="gpt-test", messages=ask("no store flag"))
        assert (await client.chat.completions.retrieve(kept.id)).id == kept.id
        upstream.script(Reply(status=500, body=b'{"error": {"message": "boom"}}'))
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="gpt-test", messages=ask("fails"))
        upstream.script(
            Reply(sse=sse(chunks({"model": "gpt-test"}, "chatcmpl-cut", pieces=5)), drop_after=2)
        )
        with pytest.raises(openai.APIError):
            stream = await client.chat.completions.create(
                model="gpt-test", messages=ask("cut"), stream=True
            )
            async for _ in stream:
                pass
        # Only the completed one is in OpenAI's list; the others are audit records.
        assert [c.id for c in (await client.chat.completions.list()).data] == [kept.id]
    await proxy.server.app[WRITER].settled()  # audit records are queued after the answer
    response = await proxy.get("/admin/exchanges", headers={"Authorization": f"Bearer {root_key}"})
    exchanges = (await response.json())["data"]
    assert [(e["outcome"], e["status"], e["caller"]) for e in exchanges] == [
        ("upstream_error", 500, "root"),
        ("upstream_failed", 200, "root"),
    ]
    assert exchanges[0]["response"] == '{"error": {"message": "boom"}}'
    assert exchanges[0]["request"]["messages"][0]["content"] == "fails"
    assert exchanges[1]["stream"] is True and "data:" in exchanges[1]["response"]


SECRET_TEXT = "my key is sk-proj-abcdefghijklmnopqrstuvwx1234 and mail me at jane.doe@example.com"


@pytest.mark.parametrize("shape", ["plain", "stream", "tool"])
async def test_redaction_masks_what_is_stored_only(
    proxy, upstream: FakeUpstream, tmp_path: Path, shape: str
) -> None:
    request = {"model": "gpt-test", "messages": ask(SECRET_TEXT), "store": True}
    if shape == "tool":
        arguments = orjson.dumps({"to": "jane.doe@example.com"}).decode()
        answer = tool_call_answer("chatcmpl-tool-secret", "send", arguments, created=1)
        upstream.script(Reply(json=answer))
    if shape == "stream":
        request["stream"] = True
    async with sdk(proxy) as client:
        if shape == "stream":
            stream = await client.chat.completions.create(**request)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert "jane.doe@example.com" in text  # the client gets the answer as it was
        else:
            made = await client.chat.completions.create(**request)
            if shape == "tool":
                assert (
                    "jane.doe@example.com"
                    in made.choices[0].message.tool_calls[0].function.arguments
                )
            else:
                assert "sk-proj-abcdefghijklmnopqrstuvwx1234" in made.choices[0].message.content
    assert SECRET_TEXT in upstream.chat_requests()[-1].body.decode()  # forwarded unmasked
    with sqlite3.connect(tmp_path / "completions.db") as db:
        request_bytes, completion_bytes = db.execute(
            "SELECT request, completion FROM completions"
        ).fetchone()
    for stored in (request_bytes, completion_bytes):
        assert b"sk-proj-abcdefghijklmnopqrstuvwx1234" not in stored
        assert b"jane.doe@example.com" not in stored
    assert b"[REDACTED:" in completion_bytes
    if shape != "tool":
        assert b"[REDACTED:openai_key]" in request_bytes


async def test_usage_and_cost_per_caller_model_and_day(team) -> None:
    proxy, keys = team
    for name, count in (("alice", 2), ("bob", 1)):
        async with sdk(proxy, keys[name]) as client:
            for n in range(count):
                await client.chat.completions.create(
                    model="gpt-test", messages=ask(f"{name}{n}"), store=True
                )
    async with sdk(proxy, keys["alice"]) as alice:
        await alice.chat.completions.create(model="gpt-unpriced", messages=ask("x"), store=True)
    root = {"Authorization": f"Bearer {keys['root']}"}
    response = await proxy.get("/admin/usage?group_by=caller,model", headers=root)
    rows = (await response.json())["data"]
    summary = [
        (r["caller"], r["model"], r["completions"], r["prompt_tokens"], r["completion_tokens"])
        for r in rows
    ]
    assert summary == [
        ("alice", "gpt-test", 2, 10, 14),
        ("alice", "gpt-unpriced", 1, 5, 7),
        ("bob", "gpt-test", 1, 5, 7),
    ]
    assert [r["cost_usd"] for r in rows] == [
        round((10 * 1.0 + 14 * 2.0) / 1e6, 6),
        None,
        round((5 * 1.0 + 7 * 2.0) / 1e6, 6),
    ]
    by_caller = (await (await proxy.get("/admin/usage?group_by=caller", headers=root)).json())[
        "data"
    ]
    assert [(r["caller"], r["completions"]) for r in by_caller] == [("alice", 3), ("bob", 1)]
    assert by_caller[0]["cost_usd"] is None  # part of alice's usage has no price
    by_day = (await (await proxy.get("/admin/usage?group_by=day", headers=root)).json())["data"]
    assert by_day[0]["day"] == "2023-11-14" and by_day[0]["completions"] == 4
    bad = await proxy.get("/admin/usage?group_by=planet", headers=root)
    assert bad.status == 400


async def test_usage_command_prints_a_table(team, tmp_path: Path) -> None:
    proxy, keys = team
    async with sdk(proxy, keys["alice"]) as alice:
        await alice.chat.completions.create(model="gpt-test", messages=ask("x"), store=True)
    config = tmp_path / "prices.yaml"
    config.write_text("prices:\n  gpt-test: {input: 1.0, output: 2.0}\n")
    code, out, err = await cli(
        "usage",
        "--config",
        str(config),
        "--db",
        str(tmp_path / "completions.db"),
        "--group-by",
        "caller,model,day",
    )
    assert code == 0, err
    lines = out.decode().splitlines()
    assert lines[0].split() == [
        "caller",
        "model",
        "day",
        "completions",
        "prompt",
        "cached",
        "completion",
        "cost_usd",
    ]
    assert lines[1].split() == ["alice", "gpt-test", "2023-11-14", "1", "5", "0", "7", "0.000019"]
    assert lines[2].split()[0] == "total"


async def test_metrics_are_scraped(team, upstream: FakeUpstream) -> None:
    proxy, keys = team
    async with sdk(proxy, keys["alice"]) as alice:
        await alice.chat.completions.create(model="gpt-test", messages=ask("x"), store=True)
        await alice.chat.completions.list()
    response = await proxy.get("/metrics", headers={"Authorization": f"Bearer {keys['root']}"})
    assert response.status == 200
    families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    requests = families["completions_proxy_requests"].samples
    assert any(s.labels["route"] == "create" and s.labels["status"] == "200" for s in requests)
    assert any(s.labels["route"] == "list" for s in requests)
    stored = [
        s
        for s in families["completions_proxy_completions_stored"].samples
        if s.name.endswith("_total")
    ]
    assert [(s.labels["caller"], s.labels["model"], s.value) for s in stored] == [
        ("alice", "gpt-test", 1.0)
    ]
    cost = [s for s in families["completions_proxy_cost_usd"].samples if s.name.endswith("_total")]
    assert cost[0].value == pytest.approx((5 * 1.0 + 7 * 2.0) / 1e6)
    assert "completions_proxy_store_queue_depth" in families
    assert "completions_proxy_overhead_seconds" in families
