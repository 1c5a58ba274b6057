"""Secrets stay out of the store and the logs (R12), callers are isolated (R13), token
comparisons are constant-time (R14), and no input can split or forge a log line (R16)."""

from __future__ import annotations

import ast
import io
import secrets
from pathlib import Path

import openai
import orjson
import pytest

from tests.fakes import FakeUpstream, Reply, chunks, sse
from tests.helpers import free_port, sdk

PROXY_DIR = Path(__file__).resolve().parent.parent / "proxy"


def files_of(db: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in db.parent.iterdir()
        if p.name.startswith(db.name) and p.is_file()
    }


async def every_path(proxy, upstream: FakeUpstream, token: str) -> None:
    """One token through every route the proxy has, successes and errors."""
    async with sdk(proxy, token) as client:
        made = await client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            store=True,
            metadata={"k": "v"},
        )
        stream = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], store=True, stream=True
        )
        async for _ in stream:
            pass
        await client.chat.completions.list(metadata={"k": "v"})
        await client.chat.completions.retrieve(made.id)
        await client.chat.completions.update(made.id, metadata={"k": "w"})
        await client.chat.completions.messages.list(made.id)
        await client.models.list()
        await client.chat.completions.delete(made.id)
        for failing in (
            client.chat.completions.retrieve(made.id),
            client.chat.completions.list(limit=1000),
            client.chat.completions.list(after="chatcmpl-nope"),
            client.chat.completions.update("nope", metadata={"a": "b"}),
        ):
            with pytest.raises(openai.APIStatusError):
                await failing
        upstream.script(Reply(status=500, json={"error": {"message": "boom"}}))
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "x"}], store=True
            )
        upstream.script(
            Reply(sse=sse(chunks({"model": "gpt-test"}, "chatcmpl-cut", pieces=5)), drop_after=2)
        )
        with pytest.raises(openai.APIError):
            cut = await client.chat.completions.create(
                model="gpt-test",
                messages=[{"role": "user", "content": "x"}],
                store=True,
                stream=True,
            )
            async for _ in cut:
                pass
    response = await proxy.post(
        "/v1/chat/completions", data=b"{bad json", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status == 400


async def test_no_token_at_rest_or_in_logs(
    proxy_factory, upstream: FakeUpstream, tmp_path: Path, json_logs: io.StringIO
) -> None:
    proxy = await proxy_factory()
    refused = await proxy_factory(upstream={"url": f"http://127.0.0.1:{free_port()}/v1"})
    tokens = [f"sk-proj-{secrets.token_hex(24)}" for _ in range(50)]
    for token in tokens:
        await every_path(proxy, upstream, token)
        response = await refused.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [], "store": True},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status == 502
    stored = files_of(tmp_path / "completions.db")
    assert "completions.db" in stored and "completions.db-wal" in stored
    logs = json_logs.getvalue()
    assert logs.count("\n") > 50 * 10  # the access log saw every request
    for token in tokens:
        secret = token.encode()
        for name, content in stored.items():
            assert secret not in content, f"token found in {name}"
            assert token.removeprefix("sk-proj-").encode() not in content
        assert token not in logs
        assert token.removeprefix("sk-proj-") not in logs


OPERATIONS = ("retrieve", "update", "delete", "messages")


async def call(client: openai.AsyncOpenAI, operation: str, completion_id: str):
    completions = client.chat.completions
    if operation == "retrieve":
        return await completions.retrieve(completion_id)
    if operation == "update":
        return await completions.update(completion_id, metadata={"owner": "intruder"})
    if operation == "delete":
        return await completions.delete(completion_id)
    return await completions.messages.list(completion_id)


async def test_callers_by_operations_matrix(proxy) -> None:
    keys = [f"sk-caller-{n}" for n in range(4)]
    clients = [sdk(proxy, key) for key in keys]
    owned: dict[int, list[str]] = {}
    for n, client in enumerate(clients):
        owned[n] = []
        for i in range(3):
            made = await client.chat.completions.create(
                model="gpt-test",
                messages=[{"role": "user", "content": f"{n}-{i}"}],
                store=True,
                metadata={"shared": "tag"},
            )
            owned[n].append(made.id)
    for n, client in enumerate(clients):
        listed = [c.id async for c in client.chat.completions.list(limit=2)]
        assert listed == owned[n]
        filtered = [c.id async for c in client.chat.completions.list(metadata={"shared": "tag"})]
        assert filtered == owned[n]
        for m, foreign_ids in owned.items():
            if m == n:
                continue
            for completion_id in foreign_ids:
                for operation in OPERATIONS:
                    with pytest.raises(openai.NotFoundError):
                        await call(client, operation, completion_id)
                with pytest.raises(openai.BadRequestError):
                    await client.chat.completions.list(after=completion_id)
    # Nothing foreign was changed or deleted: every owner still has everything, untouched.
    for n, client in enumerate(clients):
        for completion_id in owned[n]:
            got = await client.chat.completions.retrieve(completion_id)
            assert got.metadata == {"shared": "tag"}
    for client in clients:
        await client.close()


SENSITIVE = ("token", "secret", "api_key", "apikey", "password", "digest", "key_hash")


def test_token_comparisons_are_constant_time() -> None:
    """No ==/!= on anything named like a secret anywhere in proxy/: hmac.compare_digest only."""
    offenders = []
    for path in PROXY_DIR.glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            if not any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
                continue
            for side in (node.left, *node.comparators):
                name = side.id if isinstance(side, ast.Name) else getattr(side, "attr", "")
                if any(word in name.lower() for word in SENSITIVE):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


HOSTILE = "a\r\nb\nc\x1b[31mred\x1b[0m\u2028d\u2029e\x00f"


async def test_no_input_can_split_or_forge_a_log_line(
    proxy, upstream: FakeUpstream, json_logs: io.StringIO
) -> None:
    forged = '{"level": "info", "message": "forged"}'
    auth = {"Authorization": "Bearer sk-logs"}
    await proxy.post(
        "/v1/chat/completions",
        json={"model": HOSTILE, "store": True, "metadata": {HOSTILE[:60]: HOSTILE}, "messages": []},
        headers=auth,
    )
    await proxy.get(
        "/v1/chat/completions/%0d%0a" + forged.replace(" ", "%20") + "%1b%E2%80%A8", headers=auth
    )
    await proxy.get("/v1/chat/completions?model=%0d%0ax%E2%80%A8&limit=%0aboom", headers=auth)
    await proxy.get("/v1/models%0a" + forged.replace(" ", "%20"), headers=auth)
    await proxy.post("/v1/chat/completions", data=HOSTILE.encode(), headers=auth)
    upstream.script(Reply(status=500, body=HOSTILE.encode(), content_type="text/plain"))
    await proxy.post(
        "/v1/chat/completions", json={"model": "m", "messages": [], "store": True}, headers=auth
    )
    text = json_logs.getvalue()
    lines = text.split("\n")
    assert lines[-1] == ""
    assert len(lines) > 6
    for line in lines[:-1]:
        entry = orjson.loads(line)  # every line is one JSON object
        assert isinstance(entry, dict)
        assert entry.get("message") != "forged"
        for bad in ("\r", "\x1b", "\u2028", "\u2029", "\x00"):
            assert bad not in line
    assert len(text.splitlines()) == len(lines) - 1  # no reader splits a line further


async def test_access_log_line_has_what_an_auditor_needs(proxy, json_logs: io.StringIO) -> None:
    response = await proxy.post(
        "/v1/chat/completions",
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "store": True},
        headers={"Authorization": "Bearer sk-audit"},
    )
    assert response.status == 200
    completion_id = (await response.json())["id"]
    entries = [orjson.loads(line) for line in json_logs.getvalue().splitlines()]
    (entry,) = [
        e
        for e in entries
        if e["logger"] == "proxy.access" and e.get("completion_id") == completion_id
    ]
    assert entry["request_id"].startswith("req_")
    assert entry["caller"].startswith("caller_")
    assert entry["model"] == "gpt-test"
    assert entry["status"] == 200
    assert entry["outcome"] == "complete"
    assert entry["stream"] is False
    assert entry["upstream_request_id"] == f"req-up-{completion_id}"
    for timing in ("duration_ms", "upstream_ms", "proxy_ms"):
        assert entry[timing] >= 0
    errored = await proxy.get(
        "/v1/chat/completions/nope", headers={"Authorization": "Bearer sk-audit"}
    )
    request_id = errored.headers["x-request-id"]
    entries = [orjson.loads(line) for line in json_logs.getvalue().splitlines()]
    (entry,) = [e for e in entries if e.get("request_id") == request_id]
    assert entry["status"] == 404 and entry["outcome"] == "refused"
