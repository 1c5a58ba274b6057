"""Metrics: every series appears with its labels and values, read back from render(); who may
read /metrics (metrics.access) and whether callers appear in it (metrics.caller_label)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import ConfigError, validate
from proxy.metrics import OVERHEAD_BUCKETS, UPSTREAM_BUCKETS, Metrics
from tests.helpers import cli, sdk

P = "completions_proxy_"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics) -> tuple[dict[str, str], Samples]:
    """The family types by sample-name prefix, and every sample by (name, labels)."""
    body, _ = metrics.render()
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def names(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for sample_name, labels in samples if sample_name == name]


def record_request(
    metrics: Metrics,
    *,
    route: str = "create",
    status: int = 200,
    model: str | None = "gpt-4o-mini",
    stream: bool | None = True,
    outcome: str | None = "complete",
    upstream_seconds: float | None = 0.3,
    proxy_seconds: float | None = 0.0004,
) -> None:
    metrics.request(
        route=route,
        status=status,
        model=model,
        stream=stream,
        outcome=outcome,
        upstream_seconds=upstream_seconds,
        proxy_seconds=proxy_seconds,
    )


def test_requests_total_labels_and_counts() -> None:
    metrics = Metrics(lambda: 0)
    record_request(metrics)
    record_request(metrics)
    record_request(metrics, stream=False, status=502, outcome="upstream_error")
    record_request(
        metrics,
        route="list",
        model=None,
        stream=None,
        outcome=None,
        upstream_seconds=None,
    )

    types, samples = scrape(metrics)
    assert types[P + "requests"] == "counter"
    name = P + "requests_total"
    assert (
        value(
            samples,
            name,
            route="create",
            status="200",
            model="gpt-4o-mini",
            stream="true",
            outcome="complete",
        )
        == 2
    )
    assert (
        value(
            samples,
            name,
            route="create",
            status="502",
            model="gpt-4o-mini",
            stream="false",
            outcome="upstream_error",
        )
        == 1
    )
    assert value(samples, name, route="list", status="200", model="", stream="", outcome="") == 1
    assert len(names(samples, name)) == 3


def test_upstream_and_overhead_histograms() -> None:
    metrics = Metrics(lambda: 0)
    record_request(metrics, upstream_seconds=0.3, proxy_seconds=0.0004)
    record_request(metrics, upstream_seconds=90.0, proxy_seconds=0.002)
    record_request(metrics, route="list", upstream_seconds=None, proxy_seconds=0.00005)

    types, samples = scrape(metrics)
    assert types[P + "upstream_seconds"] == "histogram"
    assert types[P + "overhead_seconds"] == "histogram"

    upstream = P + "upstream_seconds"
    assert value(samples, upstream + "_count", route="create") == 2
    assert value(samples, upstream + "_sum", route="create") == pytest.approx(90.3)
    assert value(samples, upstream + "_bucket", route="create", le="0.5") == 1
    assert value(samples, upstream + "_bucket", route="create", le="120.0") == 2
    assert value(samples, upstream + "_bucket", route="create", le="+Inf") == 2
    # No upstream time for the route, so no series for it.
    assert value(samples, upstream + "_count", route="list") is None
    bounds = {labels["le"] for labels in names(samples, upstream + "_bucket")}
    assert bounds == {str(float(b)) for b in UPSTREAM_BUCKETS} | {"+Inf"}

    overhead = P + "overhead_seconds"
    assert value(samples, overhead + "_count", route="create") == 2
    assert value(samples, overhead + "_bucket", route="create", le="0.0005") == 1
    assert value(samples, overhead + "_bucket", route="create", le="0.0025") == 2
    assert value(samples, overhead + "_count", route="list") == 1
    assert value(samples, overhead + "_bucket", route="list", le="0.0001") == 1
    overhead_bounds = {float(labels["le"]) for labels in names(samples, overhead + "_bucket")}
    assert overhead_bounds == set(OVERHEAD_BUCKETS) | {math.inf}


def test_histograms_count_what_prometheus_would_and_requests_wait_for_the_flush() -> None:
    """Requests add to tallies of the Metrics object, flushed into the series at render: the
    buckets and sums come out as Histogram.observe of each value would make them, values
    equal to a bound included."""
    metrics = Metrics(lambda: 0)
    reference = Histogram("reference", "", buckets=OVERHEAD_BUCKETS, registry=CollectorRegistry())
    values = [*OVERHEAD_BUCKETS, 0.0, 0.00007, 0.0003, 0.003, 0.07, 0.2, 5.0]
    for seconds in values:
        record_request(metrics, proxy_seconds=seconds)
        reference.observe(seconds)
    _, samples = scrape(metrics)
    expected = {
        (
            sample.name.replace("reference", P + "overhead_seconds"),
            sample.labels.get("le"),
        ): sample.value
        for family in reference.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }
    got = {
        (name, dict(labels).get("le")): count
        for (name, labels), count in samples.items()
        if name.startswith(P + "overhead_seconds") and not name.endswith("_created")
    }
    assert got == pytest.approx(expected)
    _, again = scrape(metrics)  # a flush adds each request once
    assert value(again, P + "overhead_seconds_count", route="create") == len(values)


def test_queue_depth_read_at_render_time() -> None:
    depth = [3]
    metrics = Metrics(lambda: depth[0])
    types, samples = scrape(metrics)
    assert types[P + "store_queue_depth"] == "gauge"
    assert value(samples, P + "store_queue_depth") == 3

    depth[0] = 17
    _, samples = scrape(metrics)
    assert value(samples, P + "store_queue_depth") == 17


def test_write_failures() -> None:
    metrics = Metrics(lambda: 0)
    _, samples = scrape(metrics)
    # Present from the start at zero, so rate() works before the first failure.
    assert value(samples, P + "store_write_failures_total") == 0

    metrics.write_failed()
    metrics.write_failed()
    types, samples = scrape(metrics)
    assert types[P + "store_write_failures"] == "counter"
    assert value(samples, P + "store_write_failures_total") == 2


def test_stored_tokens_and_cost() -> None:
    metrics = Metrics(lambda: 0)
    metrics.stored(
        caller="abc",
        model="gpt-4o",
        prompt_tokens=100,
        cached_tokens=40,
        completion_tokens=20,
        cost=0.25,
    )
    metrics.stored(
        caller="abc",
        model="gpt-4o",
        prompt_tokens=10,
        cached_tokens=0,
        completion_tokens=5,
        cost=0.5,
    )
    metrics.stored(
        caller="xyz",
        model="gpt-4o-mini",
        prompt_tokens=7,
        cached_tokens=0,
        completion_tokens=3,
        cost=None,
    )

    types, samples = scrape(metrics)
    assert types[P + "completions_stored"] == "counter"
    assert types[P + "tokens"] == "counter"
    assert types[P + "cost_usd"] == "counter"

    stored = P + "completions_stored_total"
    assert value(samples, stored, caller="abc", model="gpt-4o") == 2
    assert value(samples, stored, caller="xyz", model="gpt-4o-mini") == 1

    tokens = P + "tokens_total"
    assert value(samples, tokens, caller="abc", model="gpt-4o", kind="prompt") == 110
    assert value(samples, tokens, caller="abc", model="gpt-4o", kind="cached") == 40
    assert value(samples, tokens, caller="abc", model="gpt-4o", kind="completion") == 25
    assert value(samples, tokens, caller="xyz", model="gpt-4o-mini", kind="prompt") == 7
    assert value(samples, tokens, caller="xyz", model="gpt-4o-mini", kind="cached") == 0
    assert value(samples, tokens, caller="xyz", model="gpt-4o-mini", kind="completion") == 3

    cost = P + "cost_usd_total"
    assert value(samples, cost, caller="abc", model="gpt-4o") == 0.75
    # Unknown cost is not counted: no series at all, rather than a misleading zero.
    assert value(samples, cost, caller="xyz", model="gpt-4o-mini") is None
    assert names(samples, cost) == [{"caller": "abc", "model": "gpt-4o"}]


def test_zero_cost_is_a_series_and_negative_usage_is_ignored() -> None:
    metrics = Metrics(lambda: 0)
    metrics.stored(
        caller="abc",
        model="local",
        prompt_tokens=-5,
        cached_tokens=0,
        completion_tokens=2,
        cost=0.0,
    )
    _, samples = scrape(metrics)
    assert value(samples, P + "cost_usd_total", caller="abc", model="local") == 0
    tokens = P + "tokens_total"
    assert value(samples, tokens, caller="abc", model="local", kind="prompt") == 0
    assert value(samples, tokens, caller="abc", model="local", kind="completion") == 2


def test_instances_do_not_share_state() -> None:
    first = Metrics(lambda: 1)
    second = Metrics(lambda: 2)
    record_request(first)
    first.write_failed()
    first.stored(
        caller="abc",
        model="gpt-4o",
        prompt_tokens=1,
        cached_tokens=0,
        completion_tokens=1,
        cost=0.1,
    )

    _, samples = scrape(second)
    assert names(samples, P + "requests_total") == []
    assert names(samples, P + "completions_stored_total") == []
    assert names(samples, P + "cost_usd_total") == []
    assert value(samples, P + "store_write_failures_total") == 0
    assert value(samples, P + "store_queue_depth") == 2

    _, samples = scrape(first)
    assert value(samples, P + "store_write_failures_total") == 1
    assert value(samples, P + "store_queue_depth") == 1


def test_render_content_type() -> None:
    body, content_type = Metrics(lambda: 0).render()
    assert content_type == CONTENT_TYPE_LATEST
    assert content_type.startswith("text/plain; version=")
    assert isinstance(body, bytes)
    assert b"# TYPE completions_proxy_requests_total counter" in body


def test_without_the_caller_label_totals_stay_and_callers_are_gone() -> None:
    metrics = Metrics(lambda: 0, caller_label=False)
    for caller in ("alice", "bob"):
        metrics.stored(
            caller=caller,
            model="gpt-4o",
            prompt_tokens=3,
            cached_tokens=1,
            completion_tokens=2,
            cost=0.5,
        )
    body, _ = metrics.render()
    assert b"alice" not in body and b"bob" not in body and b"caller=" not in body
    _, samples = scrape(metrics)
    assert value(samples, P + "completions_stored_total", model="gpt-4o") == 2
    assert value(samples, P + "tokens_total", model="gpt-4o", kind="prompt") == 6
    assert value(samples, P + "tokens_total", model="gpt-4o", kind="cached") == 2
    assert value(samples, P + "cost_usd_total", model="gpt-4o") == 1.0


def test_finished_counts_every_request() -> None:
    metrics = Metrics(lambda: 0)
    record_request(metrics)
    record_request(metrics, route="other", status=404, model=None, outcome=None)
    assert metrics.finished == 2


def test_admin_access_needs_keys_mode() -> None:
    with pytest.raises(ConfigError, match=r"metrics.access: admin needs auth.mode: keys"):
        validate({"metrics": {"access": "admin"}}, source="test")
    assert validate({"metrics": {"access": "auto"}}, source="test").metrics.access == "auto"


async def store_one(proxy, key: str) -> None:
    async with sdk(proxy, key) as client:
        await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], store=True
        )


async def test_passthrough_metrics_are_open_by_default(proxy) -> None:
    await store_one(proxy, "sk-test-alice")
    response = await proxy.get("/metrics")
    assert response.status == 200
    assert "completions_proxy_completions_stored_total{caller=" in await response.text()


@pytest.fixture
async def keyed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An admin and a member key in the database the proxy factory uses."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream-metrics-0123456789")
    db = str(tmp_path / "completions.db")
    keys = {}
    for name, role in (("ops", "admin"), ("alice", "member")):
        code, out, err = await cli("keys", "create", name, "--role", role, "--db", db)
        assert code == 0, err
        keys[name] = out.decode().strip()
    return keys


async def test_keys_mode_metrics_need_an_admin_key_by_default(proxy_factory, keyed) -> None:
    proxy = await proxy_factory(auth={"mode": "keys", "key_cache_seconds": 0})
    await store_one(proxy, keyed["alice"])
    nobody = await proxy.get("/metrics")
    assert nobody.status == 401
    assert (await nobody.json())["error"]["type"] == "invalid_request_error"
    member = await proxy.get("/metrics", headers={"Authorization": f"Bearer {keyed['alice']}"})
    assert member.status == 403
    assert "alice" not in await nobody.text() + await member.text()
    admin = await proxy.get("/metrics", headers={"Authorization": f"Bearer {keyed['ops']}"})
    assert admin.status == 200
    assert 'caller="alice"' in await admin.text()


async def test_keys_mode_metrics_can_be_opened_without_callers(proxy_factory, keyed) -> None:
    proxy = await proxy_factory(
        auth={"mode": "keys", "key_cache_seconds": 0},
        metrics={"access": "open", "caller_label": False},
    )
    await store_one(proxy, keyed["alice"])
    response = await proxy.get("/metrics")
    assert response.status == 200
    text = await response.text()
    assert 'completions_proxy_completions_stored_total{model="gpt-test"} 1.0' in text
    assert "alice" not in text and "caller=" not in text


async def test_passthrough_metrics_can_drop_the_caller_fingerprints(proxy_factory) -> None:
    proxy = await proxy_factory(metrics={"caller_label": False})
    await store_one(proxy, "sk-test-alice")
    text = await (await proxy.get("/metrics")).text()
    assert "caller=" not in text
    assert "completions_proxy_completions_stored_total{" in text
