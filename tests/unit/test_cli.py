"""The command line: upstream specs, loopback detection, env vars and --config, the no-auth guard."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from batchyard.cli import main as cli_main
from batchyard.cli.main import _is_loopback, cli, parse_upstream
from batchyard.config import Settings, UpstreamSpec


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
    # the switch only lifts the guard (it is not a setting: Settings has no insecure_no_auth any more)
    assert [s.host for s in started] == ["0.0.0.0"]
    assert started[0].api_keys == []
    assert not hasattr(started[0], "insecure_no_auth")


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


# -- one settings model: precedence, tables, errors -----------------------------------------------------------


def test_precedence_is_flag_then_env_then_file_then_default(started: list[Settings], tmp_path: Path) -> None:
    cfg = tmp_path / "batchyard.toml"
    cfg.write_text("shard-lines = 25\nmax-shards = 9\nmax_retries = 2\n")
    env = {"BATCHYARD_SHARD_LINES": "7", "BATCHYARD_MAX_SHARDS": "5"}
    result = invoke("serve", "--config", str(cfg), "--shard-lines", "3", env=env)
    assert result.exit_code == 0, result.output
    s = started[0]
    assert (s.shard_lines, s.max_shards, s.max_retries, s.lease_seconds) == (3, 5, 2, 30.0)


def test_config_file_from_the_environment(started: list[Settings], tmp_path: Path) -> None:
    cfg = tmp_path / "batchyard.toml"
    cfg.write_text("port = 9402\n")
    result = invoke("serve", env={"BATCHYARD_CONFIG": str(cfg)})
    assert result.exit_code == 0, result.output
    assert started[0].port == 9402


def test_config_tables_upstreams_with_every_field_and_models(started: list[Settings], tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    cfg = tmp_path / "batchyard.toml"
    cfg.write_text(
        "[[upstreams]]\n"
        'name = "a"\nbase_url = "http://10.0.0.5:8000/v1"\napi_key_env = "A_KEY"\nmodels = ["llama-3*"]\n'
        "weight = 2\nmax_concurrency = 6\nrpm = 600\ntpm = 90000\ntimeout = 300\npriority = -1\n"
        "[[upstreams]]\n"
        'base_url = "https://b/v1"\nmax_concurrency = "auto"\n'
        f'[models]\n"tiny-a" = "{gguf}"\n'
    )
    result = invoke("serve", "--config", str(cfg))
    assert result.exit_code == 0, result.output
    a, b = started[0].upstream_specs
    assert a == UpstreamSpec(
        base_url="http://10.0.0.5:8000/v1",
        name="a",
        api_key_env="A_KEY",
        models=["llama-3*"],
        weight=2.0,
        max_concurrency=6,
        rpm=600,
        tpm=90_000,
        timeout=300,
        priority=-1,
    )
    assert (b.base_url, b.name, b.models, b.weight, b.max_concurrency) == (
        "https://b/v1",
        None,
        ["*"],
        1.0,
        None,
    )
    assert started[0].local_models == {"tiny-a": str(gguf)}
    assert started[0].embedded_on is False  # upstreams are configured


def test_config_tables_inside_the_serve_table(started: list[Settings], tmp_path: Path) -> None:
    cfg = tmp_path / "batchyard.toml"
    cfg.write_text('[serve]\nport = 9403\n[[serve.upstreams]]\nbase_url = "http://a/v1"\n[other]\nx = 1\n')
    result = invoke("serve", "--config", str(cfg))
    assert result.exit_code == 0, result.output
    assert started[0].port == 9403
    assert [s.base_url for s in started[0].upstream_specs] == ["http://a/v1"]


def _one_error_line(result: Result) -> str:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a usage error, not a traceback
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error: ")]
    return line


def test_invalid_flag_names_the_flag(started: list[Settings]) -> None:
    line = _one_error_line(invoke("serve", "--port", "http"))
    assert "invalid value for --port:" in line and "'http'" in line
    assert "not between 1 and 65536" in _one_error_line(invoke("serve", "--concurrency", "0"))
    assert started == []


def test_invalid_env_var_names_the_variable(started: list[Settings]) -> None:
    line = _one_error_line(invoke("serve", env={"BATCHYARD_LEASE_SECONDS": "0.1"}))
    assert "invalid value for BATCHYARD_LEASE_SECONDS (environment):" in line
    assert "greater than or equal to 0.5" in line
    line = _one_error_line(invoke("serve", env={"BATCHYARD_LOG_LEVEL": "loud"}))
    assert "BATCHYARD_LOG_LEVEL" in line and "'loud'" in line
    assert started == []


def test_invalid_file_value_names_the_key_and_the_file(started: list[Settings], tmp_path: Path) -> None:
    cfg = tmp_path / "batchyard.toml"
    cfg.write_text('max-shards = "many"\n')
    line = _one_error_line(invoke("serve", "--config", str(cfg)))
    assert f"invalid value for max_shards in {cfg}:" in line and "'many'" in line
    cfg.write_text(
        '[[upstreams]]\nbase_url = "http://a/v1"\n[[upstreams]]\nbase_url = "http://b/v1"\ncolour = 1\n'
    )
    assert f"{cfg}: [[upstreams]] #2: unknown key 'colour'" in _one_error_line(
        invoke("serve", "--config", str(cfg))
    )
    cfg.write_text("[models]\ntiny = 3\n")
    assert "[models] maps model names to GGUF paths" in _one_error_line(invoke("serve", "--config", str(cfg)))
    assert started == []


def test_flag_beats_a_bad_env_value(started: list[Settings]) -> None:
    result = invoke("serve", "--port", "9600", env={"BATCHYARD_PORT": "nope"})
    assert result.exit_code == 0, result.output
    assert started[0].port == 9600


def test_unknown_file_key_is_refused_with_its_name(started: list[Settings], tmp_path: Path) -> None:
    cfg = tmp_path / "batchyard.toml"
    cfg.write_text("port = 9000\nshard-size = 10\n")
    assert "unknown option 'shard-size'" in _one_error_line(invoke("serve", "--config", str(cfg)))
    assert started == []


def test_serve_switches_from_env_and_file(started: list[Settings], tmp_path: Path) -> None:
    env = {
        "BATCHYARD_HOST": "0.0.0.0",
        "BATCHYARD_INSECURE_NO_AUTH": "1",
        "BATCHYARD_WORKER_IN_PROCESS": "true",
    }
    assert invoke("serve", env=env).exit_code == 0
    cfg = tmp_path / "batchyard.toml"
    cfg.write_text('host = "0.0.0.0"\ninsecure-no-auth = true\nno-worker = true\n')
    assert invoke("serve", "--config", str(cfg)).exit_code == 0
    assert invoke("serve").exit_code == 0
    assert [(s.host, s.worker_mode, s.run_worker) for s in started] == [
        ("0.0.0.0", "thread", True),
        ("0.0.0.0", "process", False),
        ("127.0.0.1", "process", True),
    ]


def test_webhook_url_needs_a_secret(started: list[Settings]) -> None:
    line = _one_error_line(invoke("serve", "--webhook-url", "http://127.0.0.1:9/hook"))
    assert "--webhook-url needs --webhook-secret" in line
    line = _one_error_line(invoke("serve", "--webhook-url", "ftp://x", "--webhook-secret", "s"))
    assert "webhook URL must start with http:// or https://" in line
    assert started == []


@pytest.fixture
def workers_started(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    from batchyard import runtime

    seen: list[Settings] = []

    async def fake_run_workers(settings: Settings) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(runtime, "run_workers", fake_run_workers)
    return seen


def test_worker_reads_only_its_own_options(workers_started: list[Settings], tmp_path: Path) -> None:
    # serve's options in the environment are not the worker's: ignored, as click ignored them
    result = invoke(
        "worker", "--data-dir", str(tmp_path), env={"BATCHYARD_PORT": "nope", "BATCHYARD_WORKERS": "2"}
    )
    assert result.exit_code == 0, result.output
    assert (workers_started[0].workers, workers_started[0].data_dir) == (2, tmp_path)
    cfg = tmp_path / "batchyard.toml"
    cfg.write_text("port = 9000\n")  # ...but a key the worker does not take is refused
    assert "unknown option 'port'" in _one_error_line(invoke("worker", "--config", str(cfg)))


# -- frictions: a missing extra, sizes with units, quickstart's directory, the embedded engine's threads --------


PG_MISSING = (
    "--database-url postgresql://... needs the [postgres] extra (asyncpg): pip install 'batchyard[postgres]'"
)
S3_MISSING = "--storage-url s3://... needs the [s3] extra (aiobotocore): pip install 'batchyard[s3]'"


@pytest.mark.parametrize(
    ("module", "flag", "url", "message"),
    [
        ("asyncpg", "--database-url", "postgresql://u@db.example/batchyard", PG_MISSING),
        ("asyncpg", "--database-url", "postgres://u@db.example/batchyard", PG_MISSING),
        ("aiobotocore", "--storage-url", "s3://bucket/prefix", S3_MISSING),
    ],
)
@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_missing_extra_is_one_line_and_exit_2(
    started: list[Settings],
    workers_started: list[Settings],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    module: str,
    flag: str,
    url: str,
    message: str,
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what importlib sees when the package is not installed
    result = CliRunner().invoke(cli, [command, flag, url])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"Error: {message}"]
    assert started == [] and workers_started == []


def test_an_unknown_store_scheme_is_one_line_and_exit_2(started: list[Settings]) -> None:
    result = invoke("serve", "--storage-url", "ftp://host/x")
    assert result.exit_code == 2
    assert result.output.strip() == (
        "Error: unsupported --storage-url 'ftp://host/x': use file:///PATH or s3://BUCKET/PREFIX"
    )
    result = invoke("serve", "--database-url", "mysql://h/db")
    assert result.exit_code == 2 and "unsupported --database-url 'mysql://h/db'" in result.output
    assert started == []


def test_installed_extras_pass_the_check(started: list[Settings]) -> None:
    result = invoke("serve", "--database-url", "postgresql://u@h/db", "--storage-url", "s3://b/p")
    assert result.exit_code == 0, result.output
    assert (started[0].database_url, started[0].storage_url) == ("postgresql://u@h/db", "s3://b/p")


def test_byte_defaults_show_their_units() -> None:
    text = " ".join(invoke("serve", "--help").output.split())
    assert "default: 200 MiB (209715200)" in text
    assert "default: 64 MiB (67108864)" in text
    assert "default: 100 GB (100000000000)" in text
    assert "default: 64 KiB (65536)" in text
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    assert "`200 MiB (209715200)`" in doc


def test_quickstart_dir_is_under_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchyard.cli.quickstart import default_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_dir() == tmp_path / "cache" / "batchyard" / "quickstart"
    assert default_dir().is_dir()
    (tmp_path / "ro").write_text("a file where the cache dir would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "ro"))
    fallback = default_dir()
    assert fallback.is_dir() and fallback.name.startswith("batchyard-quickstart-")
    fallback.rmdir()


def test_embedded_threads_option(started: list[Settings], tmp_path: Path) -> None:
    assert invoke("serve", "--embedded-threads", "1").exit_code == 0
    assert invoke("serve", env={"BATCHYARD_EMBEDDED_THREADS": "auto"}).exit_code == 0
    cfg = tmp_path / "batchyard.toml"
    cfg.write_text("embedded-threads = 3\n")
    assert invoke("serve", "--config", str(cfg)).exit_code == 0
    assert [s.embedded_threads for s in started] == [1, None, 3]
    assert "is not between 1 and 1024" in _one_error_line(invoke("serve", "--embedded-threads", "0"))


# -- exit codes and the error summary -------------------------------------------------------------------------


def test_exit_codes() -> None:
    from batchyard.cli import outcome

    assert outcome.exit_code("completed", 0) == 0
    assert outcome.exit_code("completed", 3) == 4
    assert [outcome.exit_code(s, 0) for s in ("failed", "expired", "cancelled")] == [3, 3, 3]


def test_error_tally_groups_by_code_with_an_example_and_a_hint() -> None:
    from batchyard.cli.outcome import RUN_HINTS, ErrorTally

    def http(status: int, code: str | None, message: str) -> bytes:
        err = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        return json.dumps(
            {"custom_id": "x", "response": {"status_code": status, "body": {"error": err}}}
        ).encode()

    def below(code: str) -> bytes:
        return json.dumps(
            {"custom_id": "x", "response": None, "error": {"code": code, "message": "m"}}
        ).encode()

    lines = [http(401, "invalid_api_key", f"bad key {i}") for i in range(5)]
    lines += [below("request_timeout")] * 2 + [http(404, None, "Not Found"), b"", b"not json"]
    tally = ErrorTally().add_lines(lines)
    assert tally.top() == [
        (5, "401", "invalid_api_key", "bad key 0"),
        (2, "", "request_timeout", "m"),
        (1, "404", "invalid_request_error", "Not Found"),  # no code: the type
    ]
    report = "\n".join(tally.report(RUN_HINTS))
    assert "5 × 401 invalid_api_key: bad key 0" in report
    assert "--upstream-api-key" in report and "--attempt-timeout" in report and "end in /v1" in report
