"""R18: the proxy serves an OpenAPI document of its own API, and schemathesis finds nothing.

Two checks are left out, each a documented choice rather than a fault:
- ``ignored_auth``: in passthrough mode any bearer token names a caller (the proxy cannot
  verify upstream keys), so an "invalid" token gets that caller's own, empty, list.
- ``positive_data_acceptance``: an ``after`` id the caller never had is a 400, by design.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import sdk

STORED_OPERATIONS = (
    "listChatCompletions",
    "getChatCompletion",
    "updateChatCompletion",
    "deleteChatCompletion",
    "getChatCompletionMessages",
)


async def test_openapi_document_is_served(proxy) -> None:
    response = await proxy.get("/openapi.json")
    assert response.status == 200
    document = await response.json()
    assert document["openapi"].startswith("3.")
    operations = {
        op["operationId"]
        for methods in document["paths"].values()
        for op in methods.values()
        if isinstance(op, dict) and "operationId" in op
    }
    assert set(STORED_OPERATIONS) <= operations


async def test_unsupported_methods_on_owned_paths_are_405_with_allow(proxy) -> None:
    response = await proxy.request(
        "PUT", "/v1/chat/completions/chatcmpl-1", headers={"Authorization": "Bearer sk"}
    )
    assert response.status == 405
    assert response.headers["Allow"] == "GET, POST, DELETE"
    assert (await response.json())["error"]["code"] == "method_not_allowed"


@pytest.mark.skipif(
    shutil.which("st", path=str(Path(sys.executable).parent)) is None,
    reason="schemathesis not installed",
)
async def test_schemathesis_finds_no_server_error_or_schema_violation(
    proxy, tmp_path: Path
) -> None:
    async with sdk(proxy, "sk-fuzz") as client:
        for n in range(3):
            await client.chat.completions.create(
                model="gpt-test",
                messages=[{"role": "user", "content": f"seed {n}"}],
                store=True,
                metadata={"n": str(n)},
            )
    st = str(Path(sys.executable).parent / "st")
    args = [
        st,
        "run",
        str(proxy.make_url("/openapi.json")),
        "-H",
        "Authorization: Bearer sk-fuzz",
        "--checks",
        "all",
        "--exclude-checks",
        "ignored_auth,positive_data_acceptance",
        "--max-examples",
        "40",
        "--seed",
        "20261122",
        "--no-color",
    ]
    for operation in STORED_OPERATIONS:
        args += ["--include-operation-id", operation]
    process = await asyncio.create_subprocess_exec(
        *args, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), 300)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-4000:]
    assert "passed" in text
