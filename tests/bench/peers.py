"""Peers for ``python -m tests.bench.run --peers``: other gateways against the same mock upstream.

- LiteLLM's proxy (``litellm[proxy]`` from PyPI, in its own venv under the peers directory):
  ``litellm --config`` with one model, ``gpt-4o-mini``, routed to the mock as an OpenAI
  endpoint; one worker; no master key (no auth); the cost map read from the package, not
  fetched; telemetry off.
- Portkey's open-source gateway (``@portkey-ai/gateway`` from npm): ``node
  build/start-server.js --headless``; each request names the provider and the mock's URL in
  ``x-portkey-provider`` / ``x-portkey-custom-host`` (127.0.0.1 is a trusted custom host by
  default). Plain requests only: its streamed answers fail (see ``peer_subjects``).

Both are single processes pinned like the proxy (subject CPU) and sent ``"store": false``:
neither stores completions, so their figures compare with relay (forwarding only). What
failed to install or start is recorded with its reason, and the run goes on without it.
Not run in CI: it needs PyPI and npm, and minutes to install.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from tests.bench.http_phase import Subject
from tests.bench.processes import SUBJECT_CPU, TOKEN, BenchError, Server

INSTALL_TIMEOUT = 1200  # seconds; litellm[proxy] pulls in a hundred packages


def _run(argv: list[str], log_path: Path, cwd: Path | None = None) -> str | None:
    """Run an install step; None when it worked, else the last lines of its output."""
    with log_path.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            done = subprocess.run(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                timeout=INSTALL_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"{argv[0]}: {error}"
    if done.returncode == 0:
        return None
    lines = log_path.read_text(errors="replace").splitlines()
    return f"exit {done.returncode}: " + " | ".join(lines[-6:])


def install_litellm(root: Path) -> tuple[Path | None, str | None]:
    """A venv with litellm[proxy]; (its litellm command, None) or (None, why not)."""
    venv = root / "litellm-venv"
    command = venv / "bin" / "litellm"
    if command.exists():
        return command, None
    log = root / "litellm-install.log"
    why = _run([sys.executable, "-m", "venv", str(venv)], log) or _run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"], log
    )
    return (None, why) if why else (command, None)


def install_portkey(root: Path) -> tuple[Path | None, str | None]:
    """@portkey-ai/gateway from npm; (its start script, None) or (None, why not)."""
    script = root / "portkey" / "node_modules" / "@portkey-ai" / "gateway" / "build"
    script = script / "start-server.js"
    if script.exists():
        return script, None
    why = _run(
        ["npm", "install", "--prefix", str(root / "portkey"), "@portkey-ai/gateway"],
        root / "portkey-install.log",
    )
    return (None, why) if why else (script, None)


def _pip_version(pip: Path, package: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            [str(pip), "show", package], capture_output=True, text=True, timeout=60, check=False
        )
        for line in done.stdout.splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def peer_subjects(  # noqa: PLR0917 - what the run hands over, in its order
    root: Path,
    workdir: Path,
    upstream: Server,
    stack: contextlib.ExitStack,
    log: Callable[[str], None],
    report: dict[str, Any],
) -> list[Subject]:
    """Install (once per ``root``), start and return the peers that work; ``report`` gets
    each one's version, or the reason it is missing."""
    subjects = []
    log(f"peers: installing into {root} (kept for the next run)")

    command, why = install_litellm(root)
    if command is None:
        report["litellm"] = {"error": f"install failed: {why}"}
        log(f"  LiteLLM: install failed: {why}")
    else:
        config = workdir / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            "  - model_name: gpt-4o-mini\n"
            "    litellm_params:\n"
            "      model: openai/gpt-4o-mini\n"
            f"      api_base: {upstream.url}/v1\n"
            "      api_key: sk-bench-upstream\n"
            "general_settings:\n"
            # The bench's bearer token, so every request passes LiteLLM's own key check, as
            # it would in use; LiteLLM refuses to start without one.
            f"  master_key: {TOKEN}\n"
            "  dangerously_permit_weak_or_unset_master_key: true\n"
        )
        server = Server(
            "litellm",
            [
                *(str(command), "--config", str(config), "--host", "127.0.0.1"),
                *("--port", "{port}", "--num_workers", "1"),
            ],
            workdir / "litellm.log",
            SUBJECT_CPU,
            health="/health/liveliness",
            env={
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_TELEMETRY": "False",
                "LITELLM_LOG": "ERROR",
            },
        )
        try:
            stack.callback(server.stop)
            server.start(timeout=180)
        except BenchError as error:
            report["litellm"] = {"error": f"did not start: {error}"}
            log(f"  LiteLLM: did not start: {error}")
        else:
            report["litellm"] = {"version": _pip_version(command.with_name("pip"), "litellm")}
            subjects.append(Subject("litellm", server, upstream, store=False))

    script, why = install_portkey(root)
    if script is None:
        report["portkey"] = {"error": f"install failed: {why}"}
        log(f"  Portkey: install failed: {why}")
    else:
        server = Server(
            "portkey",
            ["node", str(script), "--port={port}", "--headless"],
            workdir / "portkey.log",
            SUBJECT_CPU,
            health="/",
            env={"NODE_ENV": "production"},
        )
        try:
            stack.callback(server.stop)
            server.start(timeout=60)
        except BenchError as error:
            report["portkey"] = {"error": f"did not start: {error}"}
            log(f"  Portkey: did not start: {error}")
        else:
            package = orjson.loads((script.parents[1] / "package.json").read_bytes())
            report["portkey"] = {"version": package.get("version", "unknown")}
            headers = {
                "x-portkey-provider": "openai",
                "x-portkey-custom-host": upstream.url + "/v1",
            }
            # Streams fail in 1.15.2 on Node 20 ("TypeError: immutable": it appends a header
            # to the upstream's fetch Response); plain requests are measured.
            plain = ("plain_throughput", "plain_latency")
            subjects.append(
                Subject("portkey", server, upstream, store=False, runs=plain, headers=headers)
            )
    return subjects
