"""The command line: upstream specs, loopback detection, env vars and --config, the no-auth guard."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from batchyard.cli import main as cli_main
from batchyard.cli.main import _is_loopback, cli, parse_upstream
from batchyard.config import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("BATCHYARD_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(logging, "basicConfig", lambda **_: None)


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """Replace the server start with a recorder of the settings it would have run with."""
    seen: list[Settings] = []

    def fake_serve(settings: Settings) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(cli_main, "_serve_uvloop", fake_serve)
    return seen


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


# -- parse_upstream -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("http://127.0.0.1:8001/v1", (None, "http://127.0.0.1:8001/v1")),
        ("https://api.example.com/v1", (None, "https://api.example.com/v1")),
        ("gpt-4o=http://a:1/v1", ("gpt-4o", "http://a:1/v1")),
        ("llama-*=https://b/v1", ("llama-*", "https://b/v1")),
        (" m = http://a/v1 ", ("m", "http://a/v1")),
        ("=http://a/v1", (None, "http://a/v1")),
        ("*=http://a/v1", ("*", "http://a/v1")),
        ("meta-llama/Llama-3=http://a/v1", ("meta-llama/Llama-3", "http://a/v1")),
        # an "=" inside the URL is not a MODEL= prefix
        ("http://a/v1?x=y", (None, "http://a/v1?x=y")),
        ("m=http://a/v1?x=y", ("m", "http://a/v1?x=y")),
    ],
)
def test_parse_upstream(spec: str, parsed: tuple[str | None, str]) -> None:
    assert parse_upstream(spec) == parsed


@pytest.mark.parametrize(
    "spec", ["", "localhost:8000/v1", "ftp://a/v1", "m=ftp://a/v1", "m=", "m=localhost/v1"]
)
def test_parse_upstream_rejects_non_http(spec: str) -> None:
    with pytest.raises(click.BadParameter, match="must start with http:// or https://"):
        parse_upstream(spec)


# -- _is_loopback ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.8.9.10", "::1"])
def test_loopback(host: str) -> None:
    assert _is_loopback(host)


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "10.0.0.1", "192.168.1.2", "example.com", "", "localhost.evil"]
)
def test_not_loopback(host: str) -> None:
    assert not _is_loopback(host)


# -- help -----------------------------------------------------------------------------------------------------


def test_group_help_mentions_env_vars_and_config() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "BATCHYARD_<OPTION>" in result.output
    assert "--config" in result.output
    assert "serve" in result.output


def test_serve_help_names_each_env_var() -> None:
    result = invoke("serve", "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for var in [
        "BATCHYARD_HOST",
        "BATCHYARD_PORT",
        "BATCHYARD_DATA_DIR",
        "BATCHYARD_UPSTREAM",
        "BATCHYARD_API_KEY",
        "BATCHYARD_INSECURE_NO_AUTH",
        "BATCHYARD_LEASE_SECONDS",
        "BATCHYARD_MAX_RETRIES",
    ]:
        assert re.search(rf"env var: {var}[;\]]", text), var


# -- the no-auth guard ----------------------------------------------------------------------------------------


def test_public_host_without_keys_is_a_usage_error(started: list[Settings]) -> None:
    result = invoke("serve", "--host", "0.0.0.0")
    assert result.exit_code == 2
    assert "refusing to bind 0.0.0.0 with no --api-key" in result.output
    assert started == []


def test_public_host_from_env_without_keys_is_a_usage_error(started: list[Settings]) -> None:
    result = invoke("serve", env={"BATCHYARD_HOST": "10.1.2.3"})
    assert result.exit_code == 2
    assert "refusing to bind 10.1.2.3" in result.output
    assert started == []


def test_public_host_with_a_key_starts(started: list[Settings], tmp_path: Path) -> None:
    result = invoke("serve", "--host", "0.0.0.0", "--api-key", "sk-1", "--data-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert [s.host for s in started] == ["0.0.0.0"]
    assert started[0].api_keys == ["sk-1"]


def test_public_host_with_insecure_no_auth_starts(started: list[Settings]) -> None:
    result = invoke("serve", "--host", "0.0.0.0", "--insecure-no-auth")
    assert result.exit_code == 0, result.output
    assert started[0].insecure_no_auth is True
    assert started[0].api_keys == []


def test_loopback_without_keys_starts(started: list[Settings]) -> None:
    result = invoke("serve")
    assert result.exit_code == 0, result.output
    s = started[0]
    assert (s.host, s.port, s.api_keys, s.run_worker) == ("127.0.0.1", 8000, [], True)
    assert s.upstreams == []
    assert s.workers == 1


def test_workers_option(started: list[Settings]) -> None:
    assert invoke("serve", "--workers", "3").exit_code == 0
    assert invoke("serve", env={"BATCHYARD_WORKERS": "auto"}).exit_code == 0
    assert [s.workers for s in started] == [3, None]
    bad = invoke("serve", "--workers", "0")
    assert bad.exit_code != 0 and "not between 1 and 256" in bad.output


# -- options, env vars, --config ------------------------------------------------------------------------------


def test_options_reach_the_settings(started: list[Settings], tmp_path: Path) -> None:
    result = invoke(
        "serve",
        "--port", "9100",
        "--data-dir", str(tmp_path / "d"),
        "--upstream", "gpt-*=http://a/v1",
        "--upstream", "http://b/v1",
        "--upstream-api-key", "up-key",
        "--no-worker",
        "--concurrency", "8",
        "--shard-lines", "50",
        "--max-shards", "2",
        "--lease-seconds", "5",
        "--attempt-timeout", "12.5",
        "--max-retries", "0",
        "--cancel-grace", "1",
        "--max-lines", "10",
        "--max-batch-file-bytes", "1000",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    s = started[0]
    assert s.port == 9100
    assert s.data_dir == tmp_path / "d"
    assert s.upstreams == [("gpt-*", "http://a/v1"), (None, "http://b/v1")]
    assert s.upstream_api_key == "up-key"
    assert s.run_worker is False
    assert (s.concurrency, s.shard_lines, s.max_shards) == (8, 50, 2)
    assert (s.lease_seconds, s.attempt_timeout, s.max_retries, s.cancel_grace) == (5.0, 12.5, 0, 1.0)
    assert (s.max_lines, s.max_batch_file_bytes) == (10, 1000)


def test_env_vars_reach_the_settings(started: list[Settings]) -> None:
    env = {
        "BATCHYARD_PORT": "9200",
        "BATCHYARD_UPSTREAM": "m=http://a/v1 http://b/v1",
        "BATCHYARD_API_KEY": "k1 k2",
        "BATCHYARD_SHARD_LINES": "7",
        "BATCHYARD_NO_WORKER": "1",
    }
    result = invoke("serve", env=env)
    assert result.exit_code == 0, result.output
    s = started[0]
    assert s.port == 9200
    assert s.upstreams == [("m", "http://a/v1"), (None, "http://b/v1")]
    assert s.api_keys == ["k1", "k2"]
    assert s.shard_lines == 7
    assert s.run_worker is False


def test_command_line_beats_env(started: list[Settings]) -> None:
    result = invoke("serve", "--port", "9300", env={"BATCHYARD_PORT": "9200"})
    assert result.exit_code == 0, result.output
    assert started[0].port == 9300


def test_bad_upstream_is_a_usage_error(started: list[Settings]) -> None:
    result = invoke("serve", "--upstream", "localhost:8000")
    assert result.exit_code == 2
    assert "http:// or https://" in result.output
    assert started == []


def test_out_of_range_option_is_a_usage_error(started: list[Settings]) -> None:
    result = invoke("serve", "--concurrency", "0")
    assert result.exit_code == 2
    assert started == []


def test_config_serve_table(started: list[Settings], tmp_path: Path) -> None:
    cfg = tmp_path / "batchyard.toml"
    cfg.write_text('[serve]\nport = 9400\nshard-lines = 25\nmax_retries = 3\nhost = "127.0.0.1"\n')
    result = invoke("serve", "--config", str(cfg))
    assert result.exit_code == 0, result.output
    s = started[0]
    assert (s.port, s.shard_lines, s.max_retries) == (9400, 25, 3)


def test_config_top_level_keys(started: list[Settings], tmp_path: Path) -> None:
    cfg = tmp_path / "batchyard.toml"
    cfg.write_text("port = 9401\nlease-seconds = 4.5\n")
    result = invoke("serve", "--config", str(cfg))
    assert result.exit_code == 0, result.output
    assert (started[0].port, started[0].lease_seconds) == (9401, 4.5)


def test_env_and_command_line_beat_config(started: list[Settings], tmp_path: Path) -> None:
    cfg = tmp_path / "batchyard.toml"
    cfg.write_text("[serve]\nport = 9500\nmax-shards = 9\n")
    result = invoke("serve", "--config", str(cfg), "--max-shards", "3", env={"BATCHYARD_PORT": "9501"})
    assert result.exit_code == 0, result.output
    assert (started[0].port, started[0].max_shards) == (9501, 3)


def test_config_host_without_keys_is_refused(started: list[Settings], tmp_path: Path) -> None:
    cfg = tmp_path / "batchyard.toml"
    cfg.write_text('[serve]\nhost = "0.0.0.0"\n')
    result = invoke("serve", "--config", str(cfg))
    assert result.exit_code == 2
    assert "refusing to bind 0.0.0.0" in result.output
    assert started == []


def test_config_keys_named_like_repeatable_options(started: list[Settings], tmp_path: Path) -> None:
    cfg = tmp_path / "batchyard.toml"
    cfg.write_text('[serve]\nhost = "0.0.0.0"\napi-key = ["sk-cfg"]\nupstream = ["m=http://a/v1"]\n')
    result = invoke("serve", "--config", str(cfg))
    assert result.exit_code == 0, result.output
    assert started[0].api_keys == ["sk-cfg"]
    assert started[0].upstreams == [("m", "http://a/v1")]


def test_unreadable_config_is_a_usage_error(started: list[Settings], tmp_path: Path) -> None:
    result = invoke("serve", "--config", str(tmp_path / "missing.toml"))
    assert result.exit_code == 2
    assert "cannot read" in result.output
    cfg = tmp_path / "bad.toml"
    cfg.write_text("port = = 1\n")
    result = invoke("serve", "--config", str(cfg))
    assert result.exit_code == 2
    assert "cannot read" in result.output
    assert started == []
