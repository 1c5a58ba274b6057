"""The commands do what they say: usage prints small and partial costs readably, prune counts
before it deletes and asks before deleting everything, import names the format it takes,
check-config refuses what serve would refuse, serve fails on a port in use before it says
"listening", and SIGTERM ends with one shutdown line saying what was drained."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import openai
import orjson
import pytest
from aiohttp import web

from proxy.usage import dollars
from tests.fakes import FakeUpstream, Reply, completion
from tests.helpers import cli, sdk
from tests.processes import REPO, ProxyProcess, command, free_port, run_cli


def count(db: Path, table: str = "completions") -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def json_lines(text: str) -> list[dict]:
    return [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]


async def store(proxy, models: list[str], key: str = "sk-test-alice") -> None:
    async with sdk(proxy, key) as client:
        for model in models:
            await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], store=True
            )


# -- usage -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.0, "0.0000"),
        (0.1483, "0.1483"),
        (1.0, "1.0000"),
        (0.000019, "0.000019"),
        (0.0000038, "0.0000038"),
        (0.00000015, "0.00000015"),
    ],
)
def test_small_costs_keep_two_significant_digits(value: float, shown: str) -> None:
    assert dollars(value) == shown


async def test_usage_shows_tiny_costs_and_keeps_the_priced_part_of_a_total(
    proxy, tmp_path: Path
) -> None:
    await store(proxy, ["gpt-test", "gpt-test", "gpt-unpriced"])
    config = tmp_path / "prices.yaml"
    config.write_text("prices:\n  gpt-test: {input: 1.0, output: 2.0}\n", encoding="utf-8")
    db = str(tmp_path / "completions.db")

    code, out, err = await cli("usage", "--config", str(config), "--db", db, "--group-by", "model")
    assert code == 0, err
    lines = out.decode().splitlines()
    # Each fake completion has 5 prompt and 7 completion tokens: (5 * 1 + 7 * 2) / 1e6 USD.
    assert lines[1].split() == ["gpt-test", "2", "10", "0", "14", "0.000038"]
    assert lines[2].split() == ["gpt-unpriced", "1", "5", "0", "7", "-"]
    assert lines[3].split() == ["total", "3", "15", "0", "21", "0.000038*"]
    assert lines[4] == "* without gpt-unpriced: no price in the config's prices table"

    code, out, err = await cli("usage", "--config", str(config), "--db", db, "--group-by", "caller")
    assert code == 0, err
    lines = out.decode().splitlines()
    assert lines[1].split()[1:] == ["3", "15", "0", "21", "0.000038*"]  # one caller, both models
    assert lines[-1].startswith("* without gpt-unpriced")

    code, out, err = await cli(
        "usage", "--config", str(config), "--db", db, "--group-by", "caller", "--json"
    )
    assert code == 0, err
    [row] = orjson.loads(out)
    assert row["cost_usd"] is None  # never a guess: part of it has no price
    assert row["priced_cost_usd"] == pytest.approx(38 / 1e6)
    assert row["unpriced_models"] == ["gpt-unpriced"]


# -- prune -----------------------------------------------------------------------------------


async def test_prune_dry_run_counts_and_deletes_nothing(
    proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    await store(proxy, ["gpt-test", "gpt-test"])  # the fake's created: 2023-11-14
    request = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    upstream.script(Reply(json=completion(request, "chatcmpl-recent", created=int(time.time()))))
    await store(proxy, ["gpt-test"])
    await proxy.close()
    db = tmp_path / "completions.db"

    result = run_cli("prune", "--db", str(db), "--days", "30", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        "would prune 2 completions and 0 audit records older than 30 days; nothing was deleted\n"
    )
    assert count(db) == 3

    # Not everything: no question asked, even without a terminal.
    result = run_cli("prune", "--db", str(db), "--days", "30")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("pruned 2 completions and 0 audit records older than 30 days")
    assert count(db) == 1


async def test_prune_of_everything_without_a_terminal_needs_yes(proxy, tmp_path: Path) -> None:
    await store(proxy, ["gpt-test", "gpt-test"])
    await proxy.close()
    db = tmp_path / "completions.db"

    result = run_cli("prune", "--db", str(db), "--days", "1", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "(everything stored)" in result.stderr

    result = run_cli("prune", "--db", str(db), "--days", "1")
    assert result.returncode == 1
    assert result.stderr == (
        "completions-proxy: prune would delete everything stored (2 completions and 0 audit"
        " records older than 1 days); pass --yes to do it without a terminal\n"
    )
    assert count(db) == 2

    result = run_cli("prune", "--db", str(db), "--days", "1", "--yes")
    assert result.returncode == 0, result.stderr
    assert count(db) == 0


def read_terminal(controller: int) -> bytes:
    """What the process wrote next; a process silent for 30 s fails the test, never hangs it."""
    ready, _, _ = select.select([controller], [], [], 30)
    assert ready, "the process wrote nothing for 30 s"
    return os.read(controller, 1024)


def prune_on_a_terminal(db: Path, answer: bytes) -> tuple[int, str]:
    """``prune`` on a pseudo-terminal; ``answer`` typed at the question. (exit code, output)"""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [*command(), "prune", "--db", str(db), "--days", "1"],
            cwd=REPO,
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
        )
        os.close(terminal)
        seen = b""
        while b"[y/N]" not in seen:  # the question is asked before anything is deleted
            piece = read_terminal(controller)
            assert piece, f"the terminal closed before the question: {seen!r}"
            seen += piece
        assert b"This deletes everything stored: 2 completions" in seen
        assert count(db) == 2
        os.write(controller, answer)
        rest = b""
        while True:
            try:
                piece = read_terminal(controller)
            except OSError:  # EIO: the process closed its end of the terminal
                break
            if not piece:
                break
            rest += piece
        code = process.wait(timeout=30)
        # The terminal echoes the answer back and turns "\n" into "\r\n".
        return code, rest.decode().replace("\r\n", "\n").removeprefix(answer.decode())
    finally:
        os.close(controller)


async def test_prune_of_everything_asks_on_a_terminal(proxy, tmp_path: Path) -> None:
    await store(proxy, ["gpt-test", "gpt-test"])
    await proxy.close()
    db = tmp_path / "completions.db"

    code, err = await asyncio.to_thread(prune_on_a_terminal, db, b"n\n")
    assert (code, err) == (1, "nothing was deleted\n")
    assert count(db) == 2

    code, err = await asyncio.to_thread(prune_on_a_terminal, db, b"y\n")
    assert code == 0, err
    assert err.startswith("pruned 2 completions")
    assert count(db) == 0


# -- import ----------------------------------------------------------------------------------


@pytest.mark.parametrize("piped", [False, True], ids=["file", "pipe"])
async def test_importing_a_finetune_file_names_the_format_import_takes(
    proxy, tmp_path: Path, piped: bool
) -> None:
    await store(proxy, ["gpt-test"])
    finetune = tmp_path / "train.jsonl"
    code, _, err = await cli(
        "export", "--db", str(tmp_path / "completions.db"), "--format", "finetune",
        "-o", str(finetune),
    )  # fmt: skip
    assert code == 0, err
    target = tmp_path / "other.db"
    if piped:  # a pipe cannot be rewound: its first line is read, then handed on
        code, out, err = await cli("import", "-", "--db", str(target), stdin=finetune.read_bytes())
    else:
        code, out, err = await cli("import", str(finetune), "--db", str(target))
    name = "-" if piped else finetune
    assert code == 1
    assert out == b""
    assert err == (
        f"completions-proxy: {name} is in the fine-tuning format (export --format finetune),"
        " which keeps no ids or answers to import; import takes the jsonl export format"
        " (export --format jsonl, the default)\n"
    )
    assert not target.exists()


# -- check-config ------------------------------------------------------------------------------


def test_check_config_refuses_keys_mode_without_the_upstream_key(tmp_path: Path) -> None:
    config = tmp_path / "team.yaml"
    config.write_text("auth: {mode: keys, upstream_key_env: TEAM_KEY_FOR_CHECK}\n")
    env = {k: v for k, v in os.environ.items() if k != "TEAM_KEY_FOR_CHECK"}
    result = subprocess.run(
        [*command(), "check-config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "completions-proxy: auth.mode is keys, so the upstream key must be in TEAM_KEY_FOR_CHECK\n"
    )
    served = subprocess.run(
        [*command(), "serve", "--config", str(config), "--db", str(tmp_path / "x.db")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert (served.returncode, served.stderr) == (2, result.stderr)  # the same refusal

    env["TEAM_KEY_FOR_CHECK"] = "sk-team-upstream"
    result = subprocess.run(
        [*command(), "check-config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "upstream_key_env: TEAM_KEY_FOR_CHECK (set, value hidden)" in result.stdout
    assert "sk-team-upstream" not in result.stdout


# -- serve: a port in use, and the shutdown line ---------------------------------------------


def test_a_port_in_use_fails_before_listening(tmp_path: Path) -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        result = run_cli("serve", "--port", str(port), "--db", str(tmp_path / "x.db"))
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = json_lines(result.stderr)
    assert result.stderr.count("\n") == 1
    assert line["level"] == "error"
    assert line["message"] == f"cannot listen on 127.0.0.1 port {port}: Address already in use"
    assert not (tmp_path / "x.db").exists(), "the store was opened before the port was bound"


class HeldUpstream(FakeUpstream):
    """The fake upstream, holding chat requests until the test lets them go."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.expected = expected
        self.held = 0
        self.all_held = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST" and request.path.endswith("/chat/completions"):
            self.held += 1
            if self.held >= self.expected:
                self.all_held.set()
            await self.gate.wait()
        return await super().handle(request)


async def test_sigterm_logs_one_shutdown_line_with_what_was_drained(
    aiohttp_server, tmp_path: Path
) -> None:
    in_flight = 5
    fake = HeldUpstream(in_flight)
    server = await aiohttp_server(fake.app)
    proxy = ProxyProcess(
        db=tmp_path / "completions.db",
        upstream_url=str(server.make_url("/v1")),
        log_path=tmp_path / "proxy.log",
    )
    try:
        proxy.start()
        await proxy.wait_healthy()
        async with sdk_for(proxy) as client:
            tasks = [
                asyncio.create_task(
                    client.chat.completions.create(
                        model="gpt-test",
                        messages=[{"role": "user", "content": f"n{n}"}],
                        store=True,
                    )
                )
                for n in range(in_flight)
            ]
            await asyncio.wait_for(fake.all_held.wait(), 30)
            proxy.terminate()
            await proxy.wait_not_listening()
            fake.gate.set()
            answers = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert len({answer.id for answer in answers}) == in_flight
        assert await proxy.wait_exit(30) == 0
    finally:
        fake.gate.set()
        proxy.stop()
    lines = json_lines(proxy.log_path.read_text(encoding="utf-8"))
    shutdown = [line for line in lines if line["message"] == "shutdown"]
    assert len(shutdown) == 1, proxy.log_tail()
    assert shutdown[0]["requests_drained"] == in_flight
    assert shutdown[0]["completions_committed"] == in_flight
    assert shutdown[0]["shutdown_timeout"] == 30.0
    assert 0 <= shutdown[0]["seconds"] < 30
    assert lines[-1] == shutdown[0], "the shutdown line is the last word"
    listening = [line for line in lines if line["message"] == "listening"]
    assert [line["port"] for line in listening] == [proxy.port]


def sdk_for(proxy: ProxyProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-test-drain", max_retries=0)


# -- health, and the Dockerfile that uses it -------------------------------------------------


async def test_health_follows_the_serve_command_it_is_pointed_at(tmp_path: Path) -> None:
    config = tmp_path / "proxy.yaml"
    port = free_port()
    config.write_text(f"server: {{port: {port}}}\n", encoding="utf-8")
    process = ProxyProcess(
        db=tmp_path / "health.db",
        upstream_url="http://127.0.0.1:9/v1",
        log_path=tmp_path / "proxy.log",
        port=free_port(),
    )
    process.args = lambda: [  # type: ignore[method-assign]
        *command(), "serve", "--config", "proxy.yaml", "--db", str(tmp_path / "health.db"),
    ]  # fmt: skip
    process.port = port
    try:
        process.popen = subprocess.Popen(
            process.args(), cwd=tmp_path, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        await process.wait_healthy()
        # The port comes from the config file that process was started with, relative to
        # its own working directory, as in a container whose CMD names a config.
        followed = await asyncio.to_thread(
            run_cli, "health", "--pid", str(process.popen.pid), "--timeout", "5"
        )
        assert (followed.returncode, followed.stderr) == (0, "")
        direct = await asyncio.to_thread(run_cli, "health", "--port", str(port))
        assert direct.returncode == 0
        process.terminate()
        assert await process.wait_exit(30) == 0
    finally:
        process.stop()
    down = await asyncio.to_thread(run_cli, "health", "--port", str(port))
    assert down.returncode == 1
    assert down.stderr.count("\n") == 1
    assert down.stderr.startswith(f"completions-proxy: http://127.0.0.1:{port}/healthz: ")


def dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments left out."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    joined = text.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and line[0] != "#"]


def test_the_image_is_pinned_non_root_and_checks_health_in_exec_form() -> None:
    lines = dockerfile()
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert bases and all(
        base.startswith("python:3.") and base.count(".") == 2 and "-slim-" in base for base in bases
    ), bases  # an exact Python and Debian release, never a moving tag
    assert any("--constraint constraints.txt" in line for line in lines if "pip wheel" in line)
    assert [line for line in lines if line.startswith("USER ")] == ["USER 10001:10001"]
    [check] = [line for line in lines if line.startswith("HEALTHCHECK ")]
    exec_form = check.split(" CMD ", 1)[1].strip()
    assert orjson.loads(exec_form) == ["completions-proxy", "health"]
    [entry] = [line for line in lines if line.startswith("ENTRYPOINT ")]
    assert orjson.loads(entry.split(" ", 1)[1]) == ["completions-proxy"]
    constraints = (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines()
    pinned = {line.split("==")[0].lower() for line in constraints if "==" in line}
    for package in ("aiohttp", "aiosqlite", "asyncpg", "jinja2", "orjson", "pydantic", "uvloop"):
        assert package in pinned, f"{package} is not pinned in constraints.txt"


@pytest.mark.parametrize("command", ["check-config {config}", "export --config {config} --db {db}"])
def test_a_config_file_that_is_not_utf8_is_one_line_and_exit_2(
    tmp_path: Path, command: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes(b"server: {host: caf\xe9}\n")  # Latin-1
    db = tmp_path / "x.db"
    result = run_cli(*command.format(config=config, db=db).split())
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"completions-proxy: config file {config} is not UTF-8 text (the byte at offset 18)\n"
    )
    assert not db.exists()


@pytest.mark.parametrize("days", ["nan", "inf", "-1", "0", "ten"])
def test_prune_refuses_days_that_are_not_above_0_and_deletes_nothing(
    tmp_path: Path, days: str
) -> None:
    db = tmp_path / "x.db"
    assert run_cli("keys", "create", "ops", "--db", str(db)).returncode == 0
    before = db.read_bytes()
    result = run_cli("prune", "--db", str(db), f"--days={days}", "--yes")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"completions-proxy prune: error: argument --days: expected a number of days above 0,"
        f" got {days!r}"
    )
    assert db.read_bytes() == before


def test_prune_with_days_before_1970_keeps_everything(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    assert run_cli("keys", "create", "ops", "--db", str(db)).returncode == 0
    result = run_cli("prune", "--db", str(db), "--days", "1e300")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("pruned 0 completions and 0 audit records older than 1e+300")


@pytest.mark.parametrize("name", ["", "a b", "_ops", "x" * 65, "ops\u00e9"])
def test_keys_create_refuses_a_name_the_admin_api_refuses_and_creates_nothing(
    tmp_path: Path, name: str
) -> None:
    db = tmp_path / "x.db"
    result = run_cli("keys", "create", name, "--db", str(db))
    assert result.returncode == 2, result.stderr
    assert "argument name: a key name is 1-64 characters" in result.stderr.splitlines()[-1]
    assert not db.exists()
