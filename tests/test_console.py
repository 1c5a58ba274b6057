"""The web console in a real browser: Chromium driven by Playwright, against a real proxy.

One browser for the session, one proxy (keys mode, populated through the openai SDK) for the
module; each test opens a fresh browser context, so cookies never leak between tests.
Screenshots of the main pages go to ``$CONSOLE_SCREENSHOTS`` when set, else a temp folder.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import openai
import orjson
import pytest
from playwright.sync_api import Browser, BrowserContext, Dialog, Page, expect, sync_playwright

from proxy.keys import STORE
from tests.console_server import Servers
from tests.fakes import Reply, tool_call_answer

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PRICES = {"gpt-test": {"input": 1.0, "output": 2.0}}
XSS_SCRIPT = "<script>window.__xss = 1</script>"
XSS_IMG = '"><img src=x onerror="window.__xss = 2">'
XSS_LINK = "javascript:window.__xss = 3"
FILLERS = 55  # more than a page (50)
PROMPTS = (
    "Summarize the release notes for the mobile app",
    "Translate the welcome email into German",
    "Draft a polite reply to a refund request",
    "Explain this stack trace from the billing service",
    "Suggest three names for the new search feature",
    "Rewrite the onboarding checklist as bullet points",
    "Classify the sentiment of this support ticket",
    "Write a SQL query for monthly active users",
    "Review this pull request description for clarity",
    "Extract the dates from the contract excerpt",
    "Outline a postmortem for the login outage",
)
TEAMS = ("support", "search", "billing")


# Module scope, not session: Playwright's sync API keeps an event loop running in this thread
# while it is open, and the async tests of other modules need the thread's loop free.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; CI installs it (apt-get install chromium)")
        pytest.skip(f"browser tests need Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("CONSOLE_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("console-shots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def shoot(page: Page, shots: Path, name: str, *, full: bool = False) -> None:
    page.screenshot(path=str(shots / f"{name}.png"), full_page=full)


def ask(text: str, system: str | None = None) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": text}]


def tool_reply(completion_id: str) -> Reply:
    return Reply(
        json=tool_call_answer(
            completion_id,
            "get_weather",
            '{"city":"Paris","unit":"celsius"}',
            call_id="call_weather_1",
            usage={"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42},
        )
    )


def choices_reply(completion_id: str) -> Reply:
    return Reply(
        json={
            "id": completion_id,
            "object": "chat.completion",
            "created": 1700000000,
            "model": "gpt-test",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": None, "refusal": "I can't help."},
                    "finish_reason": "stop",
                },
                {
                    "index": 1,
                    "message": {"role": "assistant", "content": "Second choice text."},
                    "finish_reason": "stop",
                },
            ],
            "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
        }
    )


def march_reply(completion_id: str) -> Reply:
    return Reply(
        json={
            "id": completion_id,
            "object": "chat.completion",
            "created": 1710000000,  # 2024-03-09
            "model": "gpt-test",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "In March."},
                    "finish_reason": "stop",
                }
            ],
        }
    )


class Team:
    """The module's proxy, its keys and the ids of what was stored."""

    def __init__(self, servers: Servers, keys: dict[str, str], ids: dict[str, str]) -> None:
        self.servers = servers
        self.keys = keys
        self.ids = ids

    @property
    def url(self) -> str:
        return self.servers.url

    def sdk(self, name: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.keys[name], max_retries=0)


def admin_post(team_url: str, root: str, path: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(
        team_url + path,
        data=orjson.dumps(body) if not isinstance(body, bytes) else body,
        headers={"Authorization": f"Bearer {root}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, orjson.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, orjson.loads(error.read())


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    saved = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = "sk-upstream-console-test"
    servers = Servers(
        tmp_path_factory.mktemp("console"),
        auth={"mode": "keys", "key_cache_seconds": 0},
        prices=PRICES,
    ).start()
    try:
        keys = {"root": servers.make_key("root", "admin")}
        for name in ("alice", "bob"):
            status, made = admin_post(
                servers.url, keys["root"], "/admin/keys", {"name": name, "role": "member"}
            )
            assert status == 200, made
            keys[name] = made["key"]
        team = Team(servers, keys, {})
        alice, bob = team.sdk("alice"), team.sdk("bob")
        ids = team.ids
        # Oldest, so the first page of the log (and its screenshot) shows ordinary work.
        ids["xss"] = alice.chat.completions.create(
            model="gpt-test",
            messages=ask(f"{XSS_SCRIPT} and {XSS_IMG}", system=XSS_LINK),
            store=True,
            metadata={"link": XSS_LINK, "html": XSS_IMG},
        ).id
        for n in range(FILLERS):
            alice.chat.completions.create(
                model="gpt-test",
                messages=ask(f"{PROMPTS[n % len(PROMPTS)]} (ticket {n})"),
                store=True,
                metadata={"team": TEAMS[n % len(TEAMS)]} if n % 2 else None,
            )
        ids["plain"] = alice.chat.completions.create(
            model="gpt-test",
            messages=ask("What is the capital of France?", system="Answer in one word."),
            store=True,
            metadata={"topic": "geography"},
            temperature=0.2,
        ).id
        stream = alice.chat.completions.create(
            model="gpt-test",
            messages=ask("Tell me about lighthouses"),
            store=True,
            stream=True,
            stream_options={"include_usage": True},
        )
        ids["stream"] = next(iter(stream)).id
        for _ in stream:
            pass
        servers.upstream.script(tool_reply("chatcmpl-tool0001"))
        ids["tool"] = alice.chat.completions.create(
            model="gpt-test",
            messages=ask("Weather in Paris?"),
            store=True,
            tools=[
                {
                    "type": "function",
                    "function": {"name": "get_weather", "parameters": {"type": "object"}},
                }
            ],
        ).id
        servers.upstream.script(choices_reply("chatcmpl-choices01"))
        ids["choices"] = alice.chat.completions.create(
            model="gpt-test", messages=ask("Two answers please"), store=True, n=2
        ).id
        ids["other_model"] = alice.chat.completions.create(
            model="gpt-other", messages=ask("a different model"), store=True
        ).id
        servers.upstream.script(march_reply("chatcmpl-march001"))
        ids["march"] = alice.chat.completions.create(
            model="gpt-test", messages=ask("a question from March"), store=True
        ).id
        ids["bob"] = bob.chat.completions.create(
            model="gpt-test", messages=ask("bob's private plan"), store=True
        ).id
        servers.upstream.script(Reply(status=500, json={"error": {"message": "boom"}}))
        with pytest.raises(openai.InternalServerError):
            alice.chat.completions.create(model="gpt-test", messages=ask("fails"), store=True)
        yield team
    finally:
        servers.stop()
        if saved is None:
            del os.environ["OPENAI_API_KEY"]
        else:
            os.environ["OPENAI_API_KEY"] = saved


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    made = browser.new_context(viewport={"width": 1440, "height": 900})
    made.set_default_timeout(10_000)
    yield made
    made.close()


def sign_in(context: BrowserContext, team: Team, name: str) -> Page:
    page = context.new_page()
    page.goto(team.url + "/ui/")
    page.fill("#token", team.keys[name])
    page.press("#token", "Enter")
    page.wait_for_url("**/ui/log")
    return page


def log_ids(page: Page) -> list[str]:
    return [
        href.rsplit("/", 1)[1]
        for href in page.locator("table.log a.rowlink").evaluate_all(
            "links => links.map(a => a.getAttribute('href'))"
        )
    ]


# -- sign-in ---------------------------------------------------------------------------------


def test_sign_in_sets_a_strict_cookie_without_the_key_and_sign_out_ends_it(
    context: BrowserContext, team: Team, shots: Path
) -> None:
    page = context.new_page()
    page.goto(team.url + "/ui/log?model=gpt-test")
    assert "/ui/signin" in page.url
    shoot(page, shots, "signin")
    page.fill("#token", "cpk_000000000000_wrong")
    page.press("#token", "Enter")
    expect(page.locator(".alert")).to_contain_text("Invalid proxy key")
    page.fill("#token", team.keys["alice"])
    page.press("#token", "Enter")
    page.wait_for_url("**/ui/log?model=gpt-test")  # back where the visit began
    expect(page.locator(".who .caller")).to_have_text("alice")
    (cookie,) = [c for c in context.cookies() if c["name"] == "cp_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["expires"] > 0
    secret = team.keys["alice"].split("_", 2)[2]
    assert secret not in cookie["value"] and team.keys["alice"] not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # nothing readable by script
    assert page.evaluate("JSON.stringify(localStorage) + JSON.stringify(sessionStorage)") == (
        "{}{}"
    )
    page.click("text=Sign out")
    page.wait_for_url("**/ui/signin")
    # The old cookie, replayed, no longer opens anything.
    context.add_cookies([cookie])  # type: ignore[list-item]
    page.goto(team.url + "/ui/log")
    assert "/ui/signin" in page.url


def test_a_revoked_keys_session_stops_working(context: BrowserContext, team: Team) -> None:
    status, made = admin_post(
        team.url, team.keys["root"], "/admin/keys", {"name": "carol", "role": "member"}
    )
    assert status == 200
    team.keys["carol"] = made["key"]
    page = sign_in(context, team, "carol")
    expect(page.locator(".who .caller")).to_have_text("carol")
    status, revoked = admin_post(team.url, team.keys["root"], "/admin/keys/carol/revoke", b"")
    assert status == 200 and revoked["revoked_at"] is not None
    page.goto(team.url + "/ui/log")  # the cache window is 0 s here
    assert "/ui/signin" in page.url


# -- the log ---------------------------------------------------------------------------------


def test_log_newest_first_with_each_column(
    context: BrowserContext, team: Team, shots: Path
) -> None:
    page = sign_in(context, team, "root")
    shoot(page, shots, "log")
    ids = log_ids(page)
    assert ids[0] == team.ids["march"]  # newest first (by created), everyone's for an admin
    assert ids[1] == team.ids["bob"]
    row = page.locator("table.log tbody tr", has=page.locator(f"a[href$='{team.ids['plain']}']"))
    expect(row).to_contain_text("alice")
    expect(row).to_contain_text("gpt-test")
    expect(row).to_contain_text("What is the capital of France?")
    expect(row).to_contain_text("5 / 7")
    expect(row).to_contain_text("$0.000019")  # (5 * 1 + 7 * 2) / 1e6
    expect(row).to_contain_text("topic=geography")


def test_log_filters_by_model_metadata_and_caller(context: BrowserContext, team: Team) -> None:
    page = sign_in(context, team, "root")
    page.fill("input[name=model]", "gpt-other")
    page.press("input[name=model]", "Enter")
    page.wait_for_url("**model=gpt-other**")
    assert log_ids(page) == [team.ids["other_model"]]
    page.goto(team.url + "/ui/log")
    page.fill("input[name=meta]", "topic=geography")
    page.click("button:text('Apply')")
    page.wait_for_url("**meta=topic%3Dgeography**")
    assert log_ids(page) == [team.ids["plain"]]
    page.go_back()  # the URL holds the view: back is the unfiltered log
    assert len(log_ids(page)) == 50
    page.goto(team.url + "/ui/log?caller=bob")
    assert log_ids(page) == [team.ids["bob"]]
    expect(page.locator("input[name=caller]")).to_have_value("bob")


def test_log_pages_by_keyset_without_skips_or_repeats(context: BrowserContext, team: Team) -> None:
    page = sign_in(context, team, "alice")
    first = log_ids(page)
    assert len(first) == 50 and team.ids["bob"] not in first
    assert page.locator("th:text('Caller')").count() == 0  # a member's log has no caller
    page.keyboard.press("l")  # older
    page.wait_for_url("**after=**")
    second = log_ids(page)
    total = FILLERS + 7
    assert len(second) == total - 50 and not set(first) & set(second)
    expect(page.locator("a[rel=next]")).to_have_count(0)
    page.keyboard.press("h")  # newer
    page.wait_for_url("**before=**")
    assert log_ids(page) == first


def test_a_page_past_either_end_of_the_log_says_so(context: BrowserContext, team: Team) -> None:
    page = sign_in(context, team, "alice")
    newest = log_ids(page)[0]
    for cursor, side in ((f"after={team.ids['xss']}", "older"), (f"before={newest}", "newer")):
        page.goto(team.url + f"/ui/log?{cursor}")
        assert log_ids(page) == []
        expect(page.locator(".empty")).to_have_text(f"Nothing {side} here.")
        page.click("a:text('Newest')")
        page.wait_for_url("**/ui/log")
        assert log_ids(page)[0] == newest


def test_search_from_the_log_with_filters(context: BrowserContext, team: Team, shots: Path) -> None:
    page = sign_in(context, team, "alice")
    page.keyboard.press("/")  # the keyboard's way to the search box
    page.keyboard.type("lighthouses")
    page.keyboard.press("Enter")
    page.wait_for_url("**q=lighthouses**")
    assert log_ids(page) == [team.ids["stream"]]
    shoot(page, shots, "search")
    page.fill("#q", "celsius")  # a tool call's arguments
    page.press("#q", "Enter")
    page.wait_for_url("**q=celsius**")
    assert log_ids(page) == [team.ids["tool"]]
    page.goto(team.url + "/ui/log?q=sql+query+ticket+7")
    assert len(log_ids(page)) == 1
    page.goto(team.url + "/ui/log?q=ticket")
    assert len(log_ids(page)) == 50  # a full page of matches, newest first
    page.goto(team.url + "/ui/log?q=ticket&model=gpt-other")
    assert log_ids(page) == []
    expect(page.locator(".empty")).to_contain_text("Nothing found")
    page.goto(team.url + "/ui/log?q=private+plan")
    assert log_ids(page) == []  # bob's words, not for alice
    admin = sign_in(context.browser.new_context(), team, "root")  # type: ignore[union-attr]
    admin.goto(team.url + "/ui/log?q=private+plan")
    assert log_ids(admin) == [team.ids["bob"]]
    admin.goto(team.url + "/ui/log?q=ticket&caller=bob")
    assert log_ids(admin) == []
    admin.context.close()


def test_a_search_longer_than_the_apis_limit_is_refused_as_a_page(
    context: BrowserContext, team: Team
) -> None:
    page = sign_in(context, team, "alice")
    expect(page.locator("#q")).to_have_attribute("maxlength", "500")
    answer = page.goto(team.url + "/ui/log?" + urlencode({"q": "ticket " + "x" * 493}))
    assert answer is not None and answer.status == 200  # 500 characters: the API's limit
    answer = page.goto(team.url + "/ui/log?" + urlencode({"q": "ticket " + "x" * 494}))
    assert answer is not None and answer.status == 400
    expect(page.locator("h1")).to_contain_text("Not done")
    expect(page.locator("main")).to_contain_text("at most 500 characters")


def test_log_time_range_and_failed_outcomes(context: BrowserContext, team: Team) -> None:
    page = sign_in(context, team, "alice")
    page.fill("input[name=since]", "2024-03-01")
    page.fill("input[name=until]", "2024-03-09")  # a whole day: the 9th is in
    page.click("button:text('Apply')")
    page.wait_for_url("**since=2024-03-01**")
    assert log_ids(page) == [team.ids["march"]]
    page.goto(team.url + "/ui/log?until=2024-03-08")
    assert team.ids["march"] not in log_ids(page)
    page.goto(team.url + "/ui/log?since=2024-99-01")
    assert page.locator("h1").inner_text().startswith("Not done")
    page.goto(team.url + "/ui/log")
    page.select_option("select[name=outcome]", "upstream_error")
    page.click("button:text('Apply')")
    page.wait_for_url("**outcome=upstream_error**")
    rows = page.locator("table.log tbody tr")
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("fails")
    expect(rows).to_contain_text("500")
    assert log_ids(page) == []  # a failed exchange has no completion page


def test_log_range_in_unix_seconds_is_not_taken_for_a_day(
    context: BrowserContext, team: Team
) -> None:
    page = sign_in(context, team, "alice")
    page.goto(team.url + "/ui/log?until=1710000000")  # "until" is exclusive, as in the API
    assert team.ids["march"] not in log_ids(page)
    page.goto(team.url + "/ui/log?since=1710000000&until=1710000001")
    assert log_ids(page) == [team.ids["march"]]


def test_a_time_in_the_logs_range_is_kept_by_the_filter_form(
    context: BrowserContext, team: Team
) -> None:
    page = sign_in(context, team, "alice")
    page.goto(team.url + "/ui/log?since=2024-03-09T12:00&until=1710000001")
    assert log_ids(page) == [team.ids["march"]]
    expect(page.locator("input[name=since]")).to_have_value("2024-03-09T12:00")
    with page.expect_navigation():
        page.click("button:text('Apply')")
    assert "since=2024-03-09T12%3A00" in page.url and "until=1710000001" in page.url
    assert log_ids(page) == [team.ids["march"]]


# -- one completion --------------------------------------------------------------------------


def test_plain_completion_page(context: BrowserContext, team: Team, shots: Path) -> None:
    page = sign_in(context, team, "alice")
    page.goto(team.url + f"/ui/c/{team.ids['plain']}")
    shoot(page, shots, "completion", full=True)
    messages = page.locator("article.msg")
    expect(messages.nth(0)).to_contain_text("Answer in one word.")
    expect(messages.nth(0)).to_have_class("msg role-system")
    expect(messages.nth(1)).to_contain_text("What is the capital of France?")
    expect(messages.nth(2)).to_contain_text("echo: What is the capital of France?")
    expect(page.locator(".kv")).to_contain_text("temperature")
    expect(page.locator(".facts")).to_contain_text("$0.000019")
    expect(page.locator("#curl")).to_contain_text("/v1/chat/completions")
    python = page.locator("#python").inner_text()
    assert "client.chat.completions.create(**request)" in python
    assert "'temperature': 0.2" in python
    page.click("summary:text('Stored JSON')")
    stored = orjson.loads(page.locator("#raw").inner_text())
    assert stored["id"] == team.ids["plain"] and stored["metadata"] == {"topic": "geography"}


def test_back_to_the_log_from_a_completion_keeps_the_view(
    context: BrowserContext, team: Team
) -> None:
    page = sign_in(context, team, "alice")
    page.goto(team.url + "/ui/log?q=lighthouses&model=gpt-test")
    page.keyboard.press("j")
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/ui/c/{team.ids['stream']}")
    page.click(".crumbs a")
    page.wait_for_url("**/ui/log?q=lighthouses&model=gpt-test")
    assert log_ids(page) == [team.ids["stream"]]
    page.goto(team.url + f"/ui/c/{team.ids['stream']}")  # not from the log: the plain log
    expect(page.locator(".crumbs a")).to_have_attribute("href", "/ui/log")
    odd = page.request.get(
        team.url + f"/ui/c/{team.ids['stream']}", headers={"Referer": "http://[::1"}
    )
    assert odd.status == 200


def test_streamed_completion_page_shows_the_assembled_answer(
    context: BrowserContext, team: Team
) -> None:
    page = sign_in(context, team, "alice")
    page.goto(team.url + f"/ui/c/{team.ids['stream']}")
    expect(page.locator("article.answer")).to_contain_text("echo: Tell me about lighthouses")
    expect(page.locator(".kv")).to_contain_text("stream")
    assert "for chunk in completion:" in page.locator("#python").inner_text()


def test_tool_call_and_choices_pages(context: BrowserContext, team: Team, shots: Path) -> None:
    page = sign_in(context, team, "alice")
    page.goto(team.url + f"/ui/c/{team.ids['tool']}")
    call = page.locator(".toolcall")
    expect(call).to_contain_text("get_weather")
    expect(call).to_contain_text("call_weather_1")
    assert orjson.loads(call.locator("pre.json").inner_text()) == {
        "city": "Paris",
        "unit": "celsius",
    }
    assert '\n  "city": "Paris"' in call.locator("pre.json").inner_text()  # indented
    expect(page.locator("article.answer header .badge")).to_have_text("tool_calls")
    shoot(page, shots, "tool-call", full=True)
    page.goto(team.url + f"/ui/c/{team.ids['choices']}")
    answers = page.locator("article.answer")
    expect(answers).to_have_count(2)
    expect(answers.nth(0).locator(".refusal")).to_contain_text("I can't help.")
    expect(answers.nth(1)).to_contain_text("Second choice text.")


def test_edit_metadata_goes_through_the_api_path_and_the_audit_trail(
    context: BrowserContext, team: Team
) -> None:
    made = team.sdk("alice").chat.completions.create(
        model="gpt-test", messages=ask("edit me"), store=True, metadata={"old": "1"}
    )
    page = sign_in(context, team, "alice")
    page.goto(team.url + f"/ui/c/{made.id}")
    page.fill(".metadata .pair:nth-of-type(1) input[name=key]", "")  # removes old=1
    page.fill("input[aria-label='new key']", "reviewed")
    page.fill("input[aria-label='new value']", "yes")
    page.click("button:text('Save metadata')")
    page.wait_for_url("**saved=1")
    expect(page.locator(".notice")).to_have_text("Saved.")
    assert team.sdk("alice").chat.completions.retrieve(made.id).metadata == {"reviewed": "yes"}
    admin = sign_in(context.browser.new_context(), team, "root")  # type: ignore[union-attr]
    admin.goto(team.url + "/ui/audit?action=update_metadata")
    expect(admin.locator("table.data")).to_contain_text(made.id)
    admin.context.close()


def test_delete_with_confirmation(context: BrowserContext, team: Team) -> None:
    made = team.sdk("alice").chat.completions.create(
        model="gpt-test", messages=ask("delete me"), store=True
    )
    page = sign_in(context, team, "alice")
    page.goto(team.url + f"/ui/c/{made.id}")
    page.click("text=Delete…")
    page.wait_for_url(f"**/ui/c/{made.id}/delete")
    page.click("a:text('Cancel')")
    page.wait_for_url(f"**/ui/c/{made.id}")
    page.click("text=Delete…")
    page.click("button.danger:text('Delete')")
    page.wait_for_url(f"**/ui/log?deleted={made.id}")
    expect(page.locator(".notice")).to_contain_text(made.id)
    assert made.id not in log_ids(page)
    with pytest.raises(openai.NotFoundError):
        team.sdk("alice").chat.completions.retrieve(made.id)


def test_delete_and_saved_metadata_return_to_the_log_view_they_came_from(
    context: BrowserContext, team: Team
) -> None:
    sdk = team.sdk("alice")
    kept = sdk.chat.completions.create(model="gpt-test", messages=ask("harbour kept"), store=True)
    gone = sdk.chat.completions.create(model="gpt-test", messages=ask("harbour gone"), store=True)
    view = "/ui/log?q=harbour&model=gpt-test"
    page = sign_in(context, team, "alice")
    page.goto(team.url + view)
    page.click(f"a.rowlink[href='/ui/c/{kept.id}']")
    page.fill("input[aria-label='new key']", "checked")
    page.fill("input[aria-label='new value']", "yes")
    page.click("button:text('Save metadata')")
    page.wait_for_url("**saved=1**")
    expect(page.locator(".notice")).to_have_text("Saved.")
    page.click(".crumbs a")
    page.wait_for_url("**" + view)
    page.click(f"a.rowlink[href='/ui/c/{gone.id}']")
    page.click("text=Delete…")
    page.wait_for_url(f"**/ui/c/{gone.id}/delete**")
    page.click("a:text('Cancel')")
    expect(page.locator(".crumbs a")).to_have_attribute("href", view)
    page.click("text=Delete…")
    page.click("button.danger:text('Delete')")
    page.wait_for_url(f"**{view}&deleted={gone.id}")
    expect(page.locator(".notice")).to_contain_text(gone.id)
    assert log_ids(page) == [kept.id]
    page.click(f"a.rowlink[href='/ui/c/{kept.id}']")
    expect(page.locator(".crumbs a")).to_have_attribute("href", view)  # without the notice
    # Whatever a form or URL holds, the way back is the log: its path and query, no more.
    for given, back in (
        ("https://evil.example/ui/log?q=x", "/ui/log?q=x"),
        ("//evil.example/ui/keys", "/ui/log"),
        ("/ui/keys", "/ui/log"),
    ):
        page.goto(team.url + f"/ui/c/{kept.id}/delete?" + urlencode({"log": given}))
        expect(page.locator("input[name=log]")).to_have_value(back)
        page.goto(team.url + f"/ui/c/{kept.id}?" + urlencode({"log": given}))
        expect(page.locator(".crumbs a")).to_have_attribute("href", back)


# -- who sees what ---------------------------------------------------------------------------


def test_a_member_cannot_see_or_reach_another_callers_record(
    context: BrowserContext, team: Team
) -> None:
    page = sign_in(context, team, "alice")
    expect(page.locator("input[name=caller]")).to_have_count(0)
    expect(page.locator("nav a:text('Audit')")).to_have_count(0)
    bob = team.ids["bob"]
    assert bob not in log_ids(page)
    answer = page.goto(team.url + f"/ui/c/{bob}")
    assert answer is not None and answer.status == 404
    expect(page.locator("body")).not_to_contain_text("bob's private plan")
    assert page.goto(team.url + f"/ui/c/{bob}/delete").status == 404  # type: ignore[union-attr]
    page.goto(team.url + "/ui/log?caller=bob")  # ignored for members: still only alice's
    assert bob not in log_ids(page)
    assert page.goto(team.url + "/ui/audit").status == 403  # type: ignore[union-attr]
    assert page.goto(team.url + "/ui/keys").status == 403  # type: ignore[union-attr]


def test_an_unknown_console_path_is_a_console_page_and_api_paths_keep_json(
    context: BrowserContext, team: Team
) -> None:
    page = context.new_page()
    answer = page.goto(team.url + "/ui/nope")  # signed out: the page, without the nav
    assert answer is not None and answer.status == 404
    expect(page.locator("h1")).to_contain_text("Not found")
    page = sign_in(context, team, "alice")
    for path in ("/ui/nope", "/ui/c/x/nope"):
        answer = page.goto(team.url + path)
        assert answer is not None and answer.status == 404, path
        assert answer.headers["content-type"].startswith("text/html")
        expect(page.locator(".who .caller")).to_have_text("alice")
    page.click("main a:text('Back to the log')")
    page.wait_for_url("**/ui/log")
    for path in ("/nope", "/admin/nope", "/uinope"):
        answer = page.request.get(team.url + path)
        assert answer.status == 404, path
        assert answer.json()["error"]["code"] == "unknown_url"


def test_forms_without_the_csrf_token_are_refused_and_change_nothing(
    context: BrowserContext, team: Team
) -> None:
    target = team.ids["plain"]
    page = sign_in(context, team, "alice")
    for path, form in (
        (f"/ui/c/{target}/metadata", {"key": "hacked", "value": "1"}),
        (f"/ui/c/{target}/delete", {"confirm": "yes"}),
        (f"/ui/c/{target}/delete", {"confirm": "yes", "csrf": "forged"}),
        ("/ui/signout", {}),
    ):
        answer = page.request.post(team.url + path, form=form, max_redirects=0)
        assert answer.status == 403, path
        assert "nothing was changed" in answer.text()
    kept = team.sdk("alice").chat.completions.retrieve(target)
    assert kept.metadata == {"topic": "geography"}
    page.goto(team.url + "/ui/log")
    expect(page.locator(".who .caller")).to_have_text("alice")  # still signed in


def test_stored_markup_is_shown_as_text_and_never_runs(
    context: BrowserContext, team: Team, shots: Path
) -> None:
    dialogs: list[str] = []
    page = sign_in(context, team, "alice")
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    answer = page.goto(team.url + "/ui/log?q=xss")
    assert answer is not None
    csp = answer.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    row = page.locator("table.log tbody tr", has=page.locator(f"a[href$='{team.ids['xss']}']"))
    expect(row).to_contain_text(XSS_SCRIPT)
    expect(row).to_contain_text(f"html={XSS_IMG}")
    page.goto(team.url + f"/ui/c/{team.ids['xss']}")
    shoot(page, shots, "xss", full=True)
    expect(page.locator("article.msg").nth(0)).to_contain_text(XSS_LINK)
    expect(page.locator("article.msg").nth(1)).to_contain_text(XSS_IMG)
    assert page.locator("img").count() == 0
    assert page.locator("main script").count() == 0
    assert page.locator("a[href^='javascript']").count() == 0
    for element in page.locator("main *").all()[:400]:
        names = element.evaluate("e => e.getAttributeNames().join(' ')")
        assert " on" not in f" {names}"
    assert page.evaluate("window.__xss") is None
    assert dialogs == []


# -- usage, audit, keys ----------------------------------------------------------------------


def test_usage_page_charts_and_table(context: BrowserContext, team: Team, shots: Path) -> None:
    page = sign_in(context, team, "root")
    page.goto(team.url + "/ui/usage?since=2023-11-01&until=2023-11-30")
    shoot(page, shots, "usage", full=True)
    expect(page.locator("figure.chart")).to_have_count(5)
    assert page.locator("figure.chart rect").count() > 0
    other = page.locator("table.data").first.locator("tbody tr", has_text="gpt-other")
    expect(other).to_contain_text("2023-11-14")
    expect(other.locator("td").last).to_have_text("\u2013")  # no price for gpt-other
    bob = page.locator("table.data").nth(1).locator("tbody tr", has_text="bob")
    expect(bob).to_have_text(re.compile(r"bob\s*1\s*5\s*7\s*\$0\.000019"))
    expect(page.locator("table.data tfoot")).to_contain_text("Total")
    member = sign_in(context.browser.new_context(), team, "bob")  # type: ignore[union-attr]
    member.goto(team.url + "/ui/usage?since=2023-11-01&until=2023-11-30")
    expect(member.locator("figure.chart")).to_have_count(3)  # no per-caller charts
    expect(member.locator(".totals div").first).to_have_text("1requests")
    member.context.close()


def test_usage_dates_at_the_calendars_ends_are_refused_as_a_page(
    context: BrowserContext, team: Team
) -> None:
    page = sign_in(context, team, "bob")
    for query in ("until=9999-12-31", "until=0001-01-05"):  # no day after; no 30 days before
        answer = page.goto(team.url + f"/ui/usage?{query}")
        assert answer is not None and answer.status == 400, query
        expect(page.locator("h1")).to_contain_text("Not done")
    answer = page.goto(team.url + "/ui/usage?since=0001-01-01&until=0001-01-05")
    assert answer is not None and answer.status == 200
    expect(page.locator(".empty")).to_contain_text("No completions in these days")


def test_audit_and_failed_exchanges_pages(context: BrowserContext, team: Team, shots: Path) -> None:
    page = sign_in(context, team, "root")
    page.click("nav a:text('Audit')")
    shoot(page, shots, "audit")
    expect(page.locator("table.data")).to_contain_text("key_created")
    made_by_api = page.locator("tbody tr", has_text="key_created").filter(has_text="alice")
    expect(made_by_api.locator("td").nth(2)).to_have_text("root")  # the admin, not "cli"
    page.fill("input[name=action]", "key_revoked")
    page.press("input[name=action]", "Enter")
    page.wait_for_url("**action=key_revoked**")
    rows = page.locator("table.data tbody tr")
    for index in range(rows.count()):
        expect(rows.nth(index)).to_contain_text("key_revoked")
    page.click("nav a:text('Failed')")
    shoot(page, shots, "failed")
    expect(page.locator("table.data")).to_contain_text("upstream_error")
    page.select_option("select[name=outcome]", "client_gone")
    page.click("button:text('Apply')")
    expect(page.locator(".empty")).to_be_visible()


def test_audit_cursor_past_64_bits_is_refused_as_a_page(
    context: BrowserContext, team: Team
) -> None:
    page = sign_in(context, team, "root")
    answer = page.goto(team.url + "/ui/audit?after=99999999999999999999")
    assert answer is not None and answer.status == 400
    expect(page.locator("h1")).to_contain_text("Not done")


def test_the_audit_offers_a_later_page_only_when_there_is_one(
    browser: Browser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream-console-test")  # keys mode needs one
    servers = Servers(tmp_path, auth={"mode": "keys"}).start()
    try:
        root = servers.make_key("root", "admin")  # by "cli"
        for n in range(50):  # a page (50) of entries by root, exactly
            status, _ = admin_post(servers.url, root, "/admin/keys", {"name": f"k{n}"})
            assert status == 200
        context = browser.new_context()
        page = context.new_page()
        page.goto(servers.url + "/ui/")
        page.fill("#token", root)
        page.press("#token", "Enter")
        page.wait_for_url("**/ui/log")
        page.goto(servers.url + "/ui/audit?actor=root")
        expect(page.locator("table.data tbody tr")).to_have_count(50)
        expect(page.locator(".pager a[rel=next]")).to_have_count(0)
        page.goto(servers.url + "/ui/audit")  # 51 entries: one more page, of one entry
        page.click(".pager a[rel=next]")
        page.wait_for_url("**after=**")
        expect(page.locator("table.data tbody tr")).to_have_count(1)
        expect(page.locator(".pager a[rel=next]")).to_have_count(0)
        context.close()
    finally:
        servers.stop()


def test_keys_page_creates_shows_once_and_revokes(
    context: BrowserContext, team: Team, shots: Path
) -> None:
    page = sign_in(context, team, "root")
    page.goto(team.url + "/ui/keys")
    page.fill("input[name=name]", "dave")
    page.click("button:text('Create key')")
    key = page.locator("#newkey").inner_text().strip()
    assert key.startswith("cpk_")
    shoot(page, shots, "keys")
    with openai.OpenAI(base_url=team.url + "/v1", api_key=key, max_retries=0) as dave:
        assert dave.chat.completions.list().data == []
    page.goto(team.url + "/ui/keys")
    expect(page.locator("body")).not_to_contain_text(key)  # shown once
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("tr", has_text="dave").locator("button:text('Revoke')").click()
    expect(page.locator("tr.revoked", has_text="dave")).to_have_count(1)
    with (
        openai.OpenAI(base_url=team.url + "/v1", api_key=key, max_retries=0) as dave,
        pytest.raises(openai.AuthenticationError),
    ):
        dave.chat.completions.list()


def test_revoking_the_key_you_are_signed_in_with_says_so_first(
    context: BrowserContext, team: Team
) -> None:
    page = sign_in(context, team, "root")
    page.goto(team.url + "/ui/keys")
    own = page.locator("tr", has=page.locator("td:first-child", has_text="root"))
    expect(own.locator(".you")).to_have_text("you")
    expect(page.locator("tr", has_text="alice").locator(".you")).to_have_count(0)
    asked: list[str] = []

    def dismiss(dialog: Dialog) -> None:
        asked.append(dialog.message)
        dialog.dismiss()

    page.once("dialog", dismiss)
    own.locator("button:text('Revoke')").click()
    expect(page.locator("h2", has_text="Keys")).to_be_visible()
    assert asked == [
        "Revoke root, the key you are signed in with? This session ends within seconds, and"
        " signing in again takes another admin key."
    ]
    page.reload()  # dismissed: nothing was revoked, and the session still works
    expect(page.locator("tr.revoked", has_text="root")).to_have_count(0)


def test_admin_key_endpoints_refuse_bad_input_in_openais_shape(team: Team) -> None:
    root = team.keys["root"]
    for body, param in (
        ({"name": ""}, "name"),
        ({"name": "x y"}, "name"),
        ({"name": "eve", "role": "owner"}, "role"),
        ({"name": "eve", "colour": "red"}, "colour"),
        ({"name": "alice"}, "name"),  # taken
    ):
        status, answer = admin_post(team.url, root, "/admin/keys", body)
        assert status == 400, body
        assert set(answer["error"]) == {"message", "type", "param", "code"}
        assert answer["error"]["param"] == param
    status, answer = admin_post(team.url, root, "/admin/keys", b"[1]")
    assert status == 400
    status, answer = admin_post(team.url, root, "/admin/keys/nobody/revoke", b"")
    assert status == 404
    status, answer = admin_post(
        team.url, team.keys["alice"], "/admin/keys", {"name": "eve", "role": "admin"}
    )
    assert status == 403
    names = [k.name for k in team.servers.call(lambda: _keys(team))]
    assert "eve" not in names


async def _keys(team: Team) -> list[Any]:
    assert team.servers.app is not None
    return await team.servers.app[STORE].list_keys()


# -- passthrough and the switch --------------------------------------------------------------


def test_passthrough_sign_in_with_the_api_token(browser: Browser, tmp_path: Path) -> None:
    servers = Servers(tmp_path).start()
    try:
        with openai.OpenAI(
            base_url=servers.url + "/v1", api_key="sk-test-zoe", max_retries=0
        ) as zoe:
            made = zoe.chat.completions.create(
                model="gpt-test", messages=ask("zoe's question"), store=True
            )
        with openai.OpenAI(
            base_url=servers.url + "/v1", api_key="sk-test-yan", max_retries=0
        ) as yan:
            yan.chat.completions.create(model="gpt-test", messages=ask("yan's"), store=True)
        context = browser.new_context()
        page = context.new_page()
        page.goto(servers.url + "/ui/")
        page.fill("#token", "sk-test-zoe")
        page.press("#token", "Enter")
        page.wait_for_url("**/ui/log")
        assert log_ids(page) == [made.id]
        expect(page.locator(".role")).to_have_text("member")
        cookie = next(c for c in context.cookies() if c["name"] == "cp_session")
        assert "sk-test-zoe" not in cookie["value"]
        context.close()
    finally:
        servers.stop()


def test_the_console_can_be_switched_off(browser: Browser, tmp_path: Path) -> None:
    servers = Servers(tmp_path, console={"enabled": False}).start()
    try:
        page = browser.new_page()
        answer = page.goto(servers.url + "/ui/")
        assert answer is not None and answer.status == 404
        page.close()
    finally:
        servers.stop()


def test_with_search_off_the_log_has_no_search_box_and_a_search_url_is_refused(
    browser: Browser, tmp_path: Path
) -> None:
    servers = Servers(tmp_path, store={"search": False}).start()
    try:
        with openai.OpenAI(
            base_url=servers.url + "/v1", api_key="sk-test-zoe", max_retries=0
        ) as zoe:
            made = zoe.chat.completions.create(
                model="gpt-test", messages=ask("zoe's question"), store=True
            )
        context = browser.new_context()
        page = context.new_page()
        page.goto(servers.url + "/ui/")
        page.fill("#token", "sk-test-zoe")
        page.press("#token", "Enter")
        page.wait_for_url("**/ui/log")
        assert log_ids(page) == [made.id]  # the log and its other filters still work
        expect(page.locator("#q")).to_have_count(0)
        expect(page.locator(".search-off")).to_contain_text("store.search: false")
        answer = page.goto(servers.url + "/ui/log?q=question")
        assert answer is not None and answer.status == 400
        expect(page.locator("main")).to_contain_text("Full-text search is off")
        context.close()
    finally:
        servers.stop()
