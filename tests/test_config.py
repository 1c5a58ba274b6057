"""Config: the example file loads, unknown keys and bad values are refused, flags override."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_is_the_defaults() -> None:
    assert load_config(ROOT / "config.example.yaml") == Config()


def test_example_config_shows_every_key() -> None:
    text = (ROOT / "config.example.yaml").read_text()
    for section, model in Config.model_fields.items():
        assert f"\n{section}:" in text
        for key in getattr(model.annotation, "model_fields", {}):
            assert f"  {key}:" in text, f"{section}.{key} missing from config.example.yaml"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("server:\n  prot: 1\n", "server.prot"),
        ("bogus: {}\n", "bogus"),
        ("server:\n  port: 70000\n", "server.port"),
        ("upstream:\n  url: ftp://x\n", "upstream.url"),
        ("upstream:\n  url: https://user:pw@api.example/v1\n", "no user or query"),
        ("upstream:\n  url: https://api.example/v1?x=1\n", "no user or query"),
        ("upstream:\n  url: http:///v1\n", "must name a host"),
        ("upstream:\n  read_timeout: 0\n", "upstream.read_timeout"),
        ("store:\n  sqlite:\n    synchronous: off\n", "store.sqlite.synchronous"),
        ("store:\n  synchronous: off\n", "store.sqlite.synchronous"),  # its old place
        ("store:\n  path: a.db\n  url: b.db\n", "path is the old name of store.url"),
        ("store:\n  postgres:\n    pool_size: 3\n", "store.postgres.pool_size"),
        ("store:\n  postgres:\n    pool_min: 5\n    pool_max: 2\n", "pool_min"),
        ("retention:\n  days: .inf\n", "retention.days"),
        ("retention:\n  days: .nan\n", "retention.days"),
        ("retention:\n  interval_hours: .inf\n", "retention.interval_hours"),
        ("- a list\n", "top level"),
        ("server: [\n", "not valid YAML"),
    ],
)
def test_bad_configs_are_refused_readably(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert where in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("server:\n  port: 9000\nstore:\n  path: /tmp/a.db\n")
    config = load_config(path).with_overrides(
        {"server": {"port": 9100, "host": None}, "store": {"path": None}}
    )
    assert config.server.port == 9100
    assert config.store.path == "/tmp/a.db"


def test_check_config_hides_the_secret(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MY_PROXY_SECRET", "s3cr3t-value-that-is-long")
    path = tmp_path / "config.yaml"
    path.write_text("callers:\n  secret_env: MY_PROXY_SECRET\n")
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "MY_PROXY_SECRET" in out
    assert "s3cr3t" not in out


def test_short_secret_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COMPLETIONS_PROXY_SECRET", "short")
    assert main(["serve", "--db", str(tmp_path / "x.db")]) == 2
    assert "at least 16 bytes" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args", [["serve", "--port", "abc"], ["serve", "--upstream", "nope"], ["frobnicate"]]
)
def test_bad_flags_exit_2_with_one_message(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip()
    assert "Traceback" not in result.stderr
