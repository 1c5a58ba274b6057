"""The pytest plugin: record a test's chat completions once, replay them offline after.

Registered through the ``pytest11`` entry point, and inert unless a test asks: loading it
adds command-line options, the ``completions`` marker and the ``completions_proxy`` fixture,
and nothing runs (the proxy is not even imported) until a test uses one of them.

A test marked ``@pytest.mark.completions``, or using the ``completions_proxy`` fixture (the
base URL, for clients built by hand), gets its own proxy on a free loopback port for its
duration, with ``OPENAI_BASE_URL`` pointing at it, so a client the test builds goes through
it. ``--completions-mode``:

- ``replay`` (default): answers come from the test's recording file only; the upstream is
  never called. A request with no recording fails the test, with the request's model, the
  first field that differs from the closest recording, and the command that records it.
  Without ``OPENAI_API_KEY`` a placeholder key is set, so clients can be built in CI.
- ``record``: every request goes to the upstream; the test's file is rewritten with what
  this run got (a test that fails having recorded nothing keeps its file).
- ``fallback``: replay what is recorded, send the rest upstream and add it to the file.
- ``off``: the plugin does nothing; the test talks to the upstream directly.

The upstream is ``--completions-upstream``, else ``OPENAI_BASE_URL`` as pytest started with,
else OpenAI. Files: see ``proxy.testing.files``. Each test has its own proxy and store, so
tests share nothing through it, and any order or ``pytest-xdist`` gives the same answers.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest

if TYPE_CHECKING:  # the proxy is imported only when a test asks for it
    from proxy.testing.files import Exchange

Json = dict[str, Any]

MODES = ("record", "replay", "fallback", "off")
DEFAULT_UPSTREAM = "https://api.openai.com/v1"
FIXTURE = "completions_proxy"
MARKER = "completions"
PLACEHOLDER_KEY = "sk-completions-replay-placeholder"


@dataclass(frozen=True, slots=True)
class Settings:
    mode: Literal["record", "replay", "fallback", "off"]
    upstream: str


_SETTINGS = pytest.StashKey[Settings]()
_MISSES = pytest.StashKey[list[str]]()
_PASSED = pytest.StashKey[bool]()  # the test body ran to its end without a miss


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("completions", "chat completions recorded and replayed")
    group.addoption(
        "--completions-mode",
        choices=MODES,
        default=None,
        help="replay (default): answer from recording files only; record: call the upstream"
        " and rewrite the files; fallback: replay, record what is missing; off: no proxy",
    )
    group.addoption(
        "--completions-upstream",
        metavar="URL",
        default=None,
        help="where record and fallback send requests (default: $OPENAI_BASE_URL, else OpenAI)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: answer this test's OpenAI chat completions from its recording file"
        " (see --completions-mode)",
    )
    upstream = (
        config.getoption("completions_upstream")
        or os.environ.get("OPENAI_BASE_URL")
        or DEFAULT_UPSTREAM
    )
    config.stash[_SETTINGS] = Settings(config.getoption("completions_mode") or "replay", upstream)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if (
            isinstance(item, pytest.Function)
            and item.get_closest_marker(MARKER) is not None
            and FIXTURE not in item.fixturenames
        ):
            # First, so fixtures that build clients see OPENAI_BASE_URL already set.
            item.fixturenames.insert(0, FIXTURE)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    if _MISSES not in item.stash:  # a test without the proxy: not even its exception is touched
        return (yield)
    failure: Exception | None = None
    try:
        result = yield
    except Exception as error:  # noqa: BLE001 - raised again below; interrupts pass through
        failure = error
    _fail_on_misses(item)  # outside the except: the report shows the misses alone
    if failure is not None:
        raise failure
    item.stash[_PASSED] = True
    return result


def _fail_on_misses(item: pytest.Item) -> None:
    """A miss fails the test, even one the test caught, with every miss explained."""
    misses = item.stash.get(_MISSES, None)
    if misses:
        pytest.fail("\n\n".join(misses), pytrace=False)


def recording_name(node: pytest.Item) -> str:
    """The test's name within its module: ``Class.test[param]``."""
    return node.nodeid.split("::", 1)[-1].replace("::", ".")


def _shown(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


@dataclass(frozen=True, slots=True)
class _Explainer:
    """Describes a replay miss of one test (runs on the proxy's thread: reads only).

    The closest recording is looked for among the test's own; a test with none (new, or
    renamed) is compared with the other recordings of its module, so a rename shows.
    """

    nodeid: str
    path: Path
    root: Path
    recorded: list[Exchange]

    def _candidates(self) -> list[tuple[Path, int, Json]]:
        from proxy.testing.files import RecordingFileError, read  # noqa: PLC0415

        if self.recorded:
            return [(self.path, n, e.request) for n, e in enumerate(self.recorded, 1)]
        found = []
        for other in sorted(self.path.parent.glob("*.jsonl")):
            try:
                exchanges = read(other)
            except RecordingFileError:
                continue
            found += [(other, n, e.request) for n, e in enumerate(exchanges, 1)]
        return found

    def __call__(self, method: str, route: str, body: Any) -> str:
        from proxy.testing.mismatch import closest  # noqa: PLC0415 - loaded only when used

        if method != "POST" or not route.endswith("/chat/completions"):
            return (
                f"{self.nodeid}: {method} {route} has no recording: only chat completions"
                " are recorded and replayed, and replay never calls the upstream."
            )
        model = body.get("model") if isinstance(body, dict) else None
        lines = [
            f"{self.nodeid} sent a chat completion request (model {model!r}) with no recording."
        ]
        if not self.recorded:
            lines.append(
                f"This test has no recordings ({_shown(self.path, self.root)} does not exist)."
            )
        candidates = self._candidates() if isinstance(body, dict) else []
        near = closest([request for _, _, request in candidates], body) if candidates else None
        if near is not None:
            where, number, _ = candidates[near.index]
            shown = f"{_shown(where, self.root)}, line {number}"
            if near.first is None:
                lines.append(f"The same request is recorded for another test: {shown}.")
            else:
                whose = "" if where == self.path else " (another test's)"
                lines.append(
                    f"Closest recording{whose}: {shown}; first difference at {near.first}"
                    f" ({near.count} field(s) differ)."
                )
        lines.append(
            f"To record it: pytest --completions-mode=record '{self.nodeid}'"
            " (or --completions-mode=fallback to add only what is missing)"
        )
        return "\n".join(lines)


@pytest.fixture
def completions_proxy(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The base URL of this test's proxy (``OPENAI_BASE_URL`` points at it meanwhile)."""
    settings = request.config.stash[_SETTINGS]
    if settings.mode == "off":
        yield os.environ.get("OPENAI_BASE_URL") or settings.upstream
        return
    from proxy.testing import files  # noqa: PLC0415 - the proxy loads only when a test asks
    from proxy.testing.server import ProxyThread  # noqa: PLC0415

    node = request.node
    mode = settings.mode
    path = files.recording_path(Path(node.path), recording_name(node))
    recorded = [] if mode == "record" else files.read(path)
    explain = _Explainer(node.nodeid, path, request.config.rootpath, recorded)
    proxy = ProxyThread(mode, settings.upstream, recorded, explain)
    base_url = proxy.start()
    node.stash[_MISSES] = proxy.misses
    monkeypatch.setenv("OPENAI_BASE_URL", base_url)
    if mode != "record" and not os.environ.get("OPENAI_API_KEY"):
        monkeypatch.setenv("OPENAI_API_KEY", PLACEHOLDER_KEY)
    try:
        yield base_url
    finally:
        exchanges = proxy.stop()
        _save(path, mode, recorded, exchanges, passed=node.stash.get(_PASSED, False))


def _save(
    path: Path, mode: str, recorded: list[Exchange], exchanges: list[Exchange], *, passed: bool
) -> None:
    from proxy.testing import files  # noqa: PLC0415

    if mode == "replay" or exchanges == recorded:
        return
    if mode == "record" and not exchanges and not passed:
        return  # a broken run (upstream down, bad key, a fixture failing) keeps the recording
    files.write(path, exchanges)
