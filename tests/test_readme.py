"""The README's commands work as pasted.

Every fenced ``sh`` and ``python`` block of README.md, then of the docs pages in ``DOCS`` (the
user's guide's depth), is run, in that order, in one scratch directory, against a real proxy
process in front of the fake upstream, with two changes only:
the README's address ``127.0.0.1:8080`` becomes the test proxy's, and ``completions-proxy
serve`` also gets ``--host 127.0.0.1 --port <free port> --upstream <the fake>`` (later flags
win) and is left running in the background once healthy. ``OPENAI_API_KEY`` holds a made-up
key, so nothing leaves the machine.

A block's info string may carry one tag after the language:

- ``install``: the quick start's and development's install lines, run by ``.ci/run`` from a
  fresh venv; this test checks each of them is there, word for word.
- a tag in ``NOT_RUN``: not run here, for the reason given there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from pydantic import BaseModel

from proxy.config import Config
from tests.fakes import FakeUpstream, Reply
from tests.processes import REPO, ProxyProcess

README = REPO / "README.md"
# The docs pages that hold commands moved out of the README; their blocks are run after its own.
DOCS = [
    REPO / "docs" / name
    for name in (
        "api.md",
        "operations.md",
        "export-import.md",
        "replay.md",
        "team.md",
        "instances.md",
        "development.md",
    )
]
CONFIGURATION = REPO / "docs" / "configuration.md"
ADDRESS = "127.0.0.1:8080"

NOT_RUN = {
    "docker": "needs a Docker engine, which CI does not have: .ci/run lints the Dockerfile with"
    " hadolint, installs the package the way the Dockerfile does, and asks a running proxy with"
    " the image's health check; tests/test_cli.py checks the Dockerfile's pins, user and check",
    "postgres": "needs a PostgreSQL server at the reader's own address: tests/test_backends.py"
    " runs the whole behaviour suite, export and import included, on PostgreSQL, and"
    " tests/test_postgres.py what only PostgreSQL has (several instances, the schema lock)",
    "recipe": "runs a test suite of the reader's own against OpenAI: the offline half is run"
    " step by step by tests/test_recordings.py::test_a_committed_recording_file_replays_offline"
    " and the pytest plugin's modes by tests/test_pytest_plugin.py",
}
LANGUAGES = {"sh", "python"}

# Shell functions in front of every sh block: ``serve`` starts in the background on a free
# port in front of the fake upstream and returns once healthy; everything else runs as is.
PREAMBLE = r"""
set -euo pipefail
completions-proxy() {
    if [ "${1-}" != serve ]; then
        command completions-proxy "$@"
        return
    fi
    local port
    port=$("$READMETEST_PYTHON" -c 'import socket; s = socket.socket();
s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    command completions-proxy "$@" --host 127.0.0.1 --port "$port" \
        --upstream "$READMETEST_UPSTREAM" >>serve.log 2>&1 &
    echo $! >>"$READMETEST_PIDS"
    for _ in $(seq 200); do
        command completions-proxy health --port "$port" --timeout 1 2>/dev/null && return
        sleep 0.1
    done
    echo "serve $* did not become healthy" >&2
    return 1
}
"""


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # where the block starts in its file
    language: str
    tag: str
    text: str

    @property
    def name(self) -> str:
        tag = f" {self.tag}" if self.tag else ""
        return f"{self.path.relative_to(REPO)}:{self.line} ({self.language}{tag})"


def blocks(paths: list[Path] | None = None) -> list[Block]:
    """Every fenced block in a language this test knows, with its tag, README first."""
    found = []
    for path in paths if paths is not None else [README, *DOCS]:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"(?m)^( *)```(\w+)[ \t]*([^\n]*)\n(.*?)^\1```", text, re.S):
            indent, language, tag, body = match.groups()
            if language not in LANGUAGES:
                continue
            body = "\n".join(line.removeprefix(indent) for line in body.splitlines())
            line = text.count("\n", 0, match.start()) + 1
            found.append(Block(path, line, language, tag.strip(), body))
    return found


def test_every_block_is_run_or_says_why_not() -> None:
    found = blocks()
    assert len(blocks([README])) >= 10, "the README lost its examples, or this test its parser"
    for block in found:
        assert block.tag in {"", "install", *NOT_RUN}, f"{block.name}: unknown tag {block.tag!r}"
    run = [block for block in found if not block.tag]
    assert any("--data-urlencode 'metadata[topic]=demo'" in block.text for block in run)


def test_the_install_lines_are_what_ci_runs() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    lines = [
        line.strip()
        for block in blocks()
        if block.tag == "install"
        for line in block.text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert len(lines) >= 4
    for line in lines:
        assert line in ci, f"the README's {line!r} is not run by .ci/run"


def test_every_command_list_in_ci_stops_the_run_when_it_fails() -> None:
    """``set -e`` ignores a failure inside an ``&&`` list, so a failing lint would not fail
    CI: each list but the script's last (whose status is the script's) must end in
    ``|| exit 1``; a list sent to the background (``&``) is checked by other means."""
    lines = [
        line.split(" #")[0].rstrip()
        for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    *before, last = lines
    unchecked = [
        line
        for line in before
        if " && " in line
        and not line.endswith(("|| exit 1", "&", "&& break"))
        and not line.lstrip().startswith(("if ", "for ", "while "))
    ]
    assert not unchecked, f"these lists can fail without failing .ci/run: {unchecked}"
    assert " && " in last and last.endswith(".venv/bin/pytest"), last


class RecentUpstream(FakeUpstream):
    """The fake upstream, answering with completions created now, as OpenAI does."""

    def default(self, request: web.Request, body: bytes) -> Reply:
        reply = super().default(request, body)
        if reply.json is not None and reply.json.get("object") == "chat.completion":
            reply.json = {**reply.json, "created": int(time.time())}
        return reply


def run_block(block: Block, workdir: Path, env: dict[str, str], port: int) -> str:
    """Run one block in ``workdir``; its standard output."""
    text = block.text.replace(ADDRESS, f"127.0.0.1:{port}")
    if block.language == "sh":
        args = ["bash", "-c", PREAMBLE + text]
    else:
        args = [sys.executable, "-c", text]
    result = subprocess.run(
        args, cwd=workdir, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    serve_log = workdir / "serve.log"
    assert result.returncode == 0, (
        f"{block.name} failed with exit code {result.returncode}\n--- block\n{text}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}\n--- serve.log\n"
        f"{serve_log.read_text() if serve_log.exists() else ''}"
    )
    return result.stdout


def stop_all(pids: set[int]) -> None:
    """SIGTERM the servers the blocks started, wait for them to go, SIGKILL any that stay."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while pids and time.monotonic() < deadline:
        for pid in list(pids):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                pids.discard(pid)
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_the_readme_commands_run_as_pasted(aiohttp_server, tmp_path: Path) -> None:
    fake = RecentUpstream()
    server = await aiohttp_server(fake.app)
    upstream_url = str(server.make_url("/v1"))
    workdir = tmp_path / "reader"
    workdir.mkdir()
    pids = tmp_path / "pids"
    pids.touch()
    proxy = ProxyProcess(
        db=workdir / "completions.db",  # the README's default, in the reader's directory
        upstream_url=upstream_url,
        log_path=tmp_path / "proxy.log",
    )
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "OPENAI_API_KEY": "sk-readme-test-not-a-real-key",
        "READMETEST_UPSTREAM": upstream_url,
        "READMETEST_PIDS": str(pids),
        "READMETEST_PYTHON": sys.executable,
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("OPENAI_BASE_URL", "COMPLETIONS_PROXY_SECRET"):
        env.pop(name, None)
    ran: list[str] = []
    outputs: dict[str, str] = {}
    try:
        proxy.start()
        await proxy.wait_healthy()
        for block in blocks():
            if block.tag:
                continue
            out = await asyncio.to_thread(run_block, block, workdir, env, proxy.port)
            ran.append(block.name)
            outputs[block.text] = out
    finally:
        proxy.stop()
        await asyncio.to_thread(stop_all, {int(line) for line in pids.read_text().split()})
    assert len(ran) >= 8, ran
    # The quick start's list finds the completion its first command stored (curl globbing the
    # brackets would have printed nothing), and the SDK example prints the answer it stored.
    [curl] = [text for text in outputs if "curl" in text and "metadata[topic]=demo" in text]
    [listed] = [
        orjson.loads(line) for line in outputs[curl].splitlines() if '"object":"list"' in line
    ]
    assert [item["metadata"] for item in listed["data"]] == [{"topic": "demo"}]
    [sdk_example] = [text for text in outputs if "client.chat.completions.delete" in text]
    assert outputs[sdk_example].startswith("echo: Say hello\n")
    # What the quick start stored is there: the curl and SDK examples went through the proxy.
    assert [r.json()["model"] for r in fake.chat_requests()][:2] == ["gpt-4o-mini"] * 2


@pytest.mark.parametrize("tag", sorted(NOT_RUN))
def test_blocks_not_run_exist_for_each_reason(tag: str) -> None:
    assert any(block.tag == tag for block in blocks()), f"no block is tagged {tag!r} any more"


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of the configuration tree, dotted; a mapping (prices, patterns) is one key."""
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += config_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_the_docs_pages_are_linked_from_the_readme() -> None:
    text = README.read_text(encoding="utf-8")
    for path in [*DOCS, CONFIGURATION]:
        assert f"]({path.relative_to(REPO)}" in text, f"the README does not link {path.name}"


def test_the_readme_configuration_overview_names_every_section() -> None:
    text = README.read_text(encoding="utf-8")
    overview = text[text.index("\n## Configuration\n") :]
    overview = overview[: overview.index("\n## ", 1)]
    named = set(re.findall(r"(?m)^\| `([a-z_]+)` \|", overview))
    assert named == set(Config.model_fields), "the README's configuration overview is off"
    assert "](docs/configuration.md)" in overview


def test_the_configuration_table_has_every_key() -> None:
    table = CONFIGURATION.read_text(encoding="utf-8")
    documented = set(re.findall(r"(?m)^\| `([a-z_.]+)(?:\.<model>)?`", table))
    keys = config_keys(Config)
    assert len(keys) > 30
    missing = [key for key in keys if key not in documented]
    assert missing == [], f"keys missing from docs/configuration.md's table: {missing}"
    unknown = sorted(documented - set(keys))
    assert unknown == [], f"docs/configuration.md documents keys the config lacks: {unknown}"
