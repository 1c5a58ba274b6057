"""Helpers the test modules share: SDK clients, the error-shape check, CLI runs, recordings.

Test modules import shared helpers from here (fixtures live in conftest.py), never from
another test module, so each test module can change or go without breaking the others.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

import openai
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.store import CompletionRecord
from proxy.writer import Writer
from tests.processes import free_port

__all__ = [
    "ASK",
    "TOOLS",
    "assert_error_shape",
    "cli",
    "commit_at",
    "free_port",
    "sdk",
    "tool_completion",
]


def sdk(
    proxy: TestClient[web.Request, web.Application], key: str = "sk-test-alice"
) -> openai.AsyncOpenAI:
    """The official async SDK pointed at an in-process proxy, with retries off."""
    return openai.AsyncOpenAI(base_url=str(proxy.make_url("/v1")), api_key=key, max_retries=0)


def assert_error_shape(body: dict, headers) -> None:
    """OpenAI's error object, JSON, with the proxy's request id."""
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert headers["Content-Type"].startswith("application/json")
    assert headers["x-request-id"].startswith("req_")


async def commit_at(
    writer: Writer, passes: Sequence[int], records: Sequence[CompletionRecord]
) -> None:
    """Start ``writer`` and, once it waits on its queue, queue each record after its number
    of event-loop turns (``passes``); wait for every commit, then close the writer. Records
    queued at chosen turns show how the writer groups them into commits (``writer.stats``)."""

    async def after(turns: int, record: CompletionRecord) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)
        await writer.commit(record)

    writer.start()
    await asyncio.sleep(0)  # the writer waits on its queue
    try:
        await asyncio.gather(*map(after, passes, records))
    finally:
        await writer.close()


async def cli(*args: str, stdin: bytes | None = None) -> tuple[int, bytes, str]:
    """``python -m proxy ARGS`` without blocking the event loop: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 120)
    assert process.returncode is not None
    return process.returncode, out, err.decode()


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
ASK = [{"role": "user", "content": "weather in Paris?"}]


def tool_completion(completion_id: str) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": 1700000001,
        "model": "gpt-test-2024-01-01",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "tool_calls": [
                        {
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":'},
                        },
                        {
                            "id": "call_b",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": "Lyon"}'},
                        },
                    ],
                },
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
        "system_fingerprint": "fp_tools",
    }
