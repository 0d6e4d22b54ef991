"""Where settings come from: the command line, the environment and the `--config` TOML file, in that order.

`load` layers them over the model's defaults (a flag beats `BATCHYARD_*`, which beats the file) and turns an
invalid value into one `SettingsError` line that names the setting and where it came from. `options` lists the
settings each command takes (the command line is built from it), and `markdown_table` writes them for
docs/configuration.md (`python -m batchyard.settings_sources --markdown`).
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource
from pydantic_settings.exceptions import SettingsError as _SourceError

from batchyard.config import COMMAND_SCOPES, ENV_PREFIX, Option, ServeSwitches, Settings

M = TypeVar("M", bound=BaseSettings)
_MODELS: tuple[type[BaseSettings], ...] = (Settings, ServeSwitches)


class SettingsError(ValueError):
    """An invalid or unknown setting; the message is one line that says which and where it came from."""


@dataclass(frozen=True, slots=True)
class OptionField:
    """A field that is an option: its flag, env var and TOML key all come from `key`."""

    model: type[BaseSettings]
    name: str  # the field's name
    info: FieldInfo
    option: Option

    @property
    def key(self) -> str:
        """The option's name: `--max-shards` is `max_shards`, BATCHYARD_MAX_SHARDS, `max-shards` in the file."""
        flag = self.option.flag
        return flag.split("/")[0].removeprefix("--").replace("-", "_") if flag else self.name

    @property
    def flag(self) -> str:
        return self.option.flag or "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def is_bool(self) -> bool:
        return self.info.annotation in (bool, bool | None)

    @property
    def multiple(self) -> bool:
        return get_origin(self.info.annotation) is list

    @property
    def default(self) -> Any:
        return self.info.get_default(call_default_factory=True)

    @property
    def default_text(self) -> str | None:
        """The default as --help and the docs show it; None when there is none to show."""
        if self.option.default_text is not None:
            return self.option.default_text
        value = self.default
        if value is None or value == []:
            return None
        if isinstance(value, bool):
            return "on" if value else "off"
        return str(value)

    @property
    def metavar(self) -> str | None:
        if self.option.metavar:
            return self.option.metavar
        args = get_args(self.info.annotation)
        if args and all(isinstance(a, str) for a in args):  # a Literal
            return "[" + "|".join(args) + "]"
        kind = next((a for a in (int, float) if self.info.annotation in (a, a | None)), None)
        return {int: "INTEGER", float: "FLOAT"}.get(kind) if kind is not None else None


def options(command: str | None = None) -> list[OptionField]:
    """The options of `command` (all of them for None), in the models' order."""
    scopes = COMMAND_SCOPES[command] if command else ("execution", "state", "serve", "worker")
    found = [
        OptionField(model, name, info, meta)
        for model in _MODELS
        for name, info in model.model_fields.items()
        for meta in info.metadata
        if isinstance(meta, Option)
    ]
    return [f for f in found if f.option.scope in scopes]


class ConfigFileSource(PydanticBaseSettingsSource):
    """The TOML file: keys named like the options (`-` or `_`), at the top level or in a `[serve]` table, and the
    `[[upstreams]]` and `[models]` tables. A key that is no option of the command is refused; other tables are
    ignored."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path, allowed: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.path = path
        self.allowed = allowed  # option key -> field name

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        try:
            with open(self.path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise SettingsError(f"cannot read {self.path}: {e}") from None
        section: dict[str, Any] = data.get("serve", data)
        values: dict[str, Any] = {}
        tables = data.get("upstreams", section.get("upstreams"))
        if isinstance(tables, list) and all(isinstance(t, dict) for t in tables):
            values["upstream_specs"] = tables
            section = {k: v for k, v in section.items() if k != "upstreams"}
        models = data.get("models", section.get("models"))
        if models is not None:
            values["local_models"] = models
        for k, v in section.items():
            if k == "models" or isinstance(v, dict) or (isinstance(v, list) and v and isinstance(v[0], dict)):
                continue
            name = self.allowed.get(k.replace("-", "_"))
            if name is None:
                raise SettingsError(f"{self.path}: unknown option {k!r}")
            values[name] = v
        return values


@dataclass(frozen=True, slots=True)
class _Layer:
    label: str  # "flag", "env" or "file"
    values: dict[str, Any]


def _env(model: type[BaseSettings]) -> dict[str, Any]:
    try:
        found = EnvSettingsSource(model)()
    except _SourceError as e:
        raise SettingsError(str(e)) from None
    by_alias = {f.validation_alias: name for name, f in model.model_fields.items() if f.validation_alias}
    return {by_alias.get(k, k): v for k, v in found.items()}


def load(
    command: str, flags: Mapping[str, Any], config: Path | None = None
) -> tuple[Settings, ServeSwitches]:
    """The settings of `command`: `flags` (field name -> what the command line gave) over the BATCHYARD_*
    environment over the `config` file over the defaults. Raises SettingsError."""
    fields = {f.name: f for f in options(command)}
    allowed = {f.key: f.name for f in fields.values()}
    layers = [_Layer("flag", dict(flags))]
    env = {k: v for model in _MODELS for k, v in _env(model).items() if k in fields}
    layers.append(_Layer("env", env))
    if config is not None:
        layers.append(_Layer("file", ConfigFileSource(Settings, config, allowed)()))

    def merged(model: type[BaseSettings]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for layer in reversed(layers):
            out.update((k, v) for k, v in layer.values.items() if k in model.model_fields)
        return out

    switches = _validate(ServeSwitches, merged(ServeSwitches), layers, fields, config)
    values = merged(Settings)
    if "serve" in COMMAND_SCOPES[command]:
        values["run_worker"] = not switches.no_worker
        values["worker_mode"] = "thread" if switches.worker_in_process else "process"
    return _validate(Settings, values, layers, fields, config), switches


def _validate(
    model: type[M],
    values: dict[str, Any],
    layers: list[_Layer],
    fields: Mapping[str, OptionField],
    config: Path | None,
) -> M:
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise SettingsError(_describe(e.errors()[0], layers, fields, config)) from None


def _describe(
    error: Any, layers: list[_Layer], fields: Mapping[str, OptionField], config: Path | None
) -> str:
    loc = error["loc"]
    by_alias = {f.env: f.name for f in fields.values()}
    name = by_alias.get(loc[0], loc[0]) if loc else ""
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    if error["type"] != "value_error" and "input" in error and not isinstance(error["input"], dict):
        message += f" (got {error['input']!r})"
    if name == "upstream_specs":
        where, inner = f"[[upstreams]] #{int(loc[1]) + 1}", ".".join(map(str, loc[2:]))
        if error["type"] == "extra_forbidden":
            message = f"unknown key {inner!r}"
        elif error["type"] != "value_error":
            message = f"{inner}: {message}"
        return f"{config}: {where}: {message}"
    if name == "local_models":
        return f'{config}: [models] maps model names to GGUF paths: name = "/path.gguf" ({message})'
    source = next((layer.label for layer in layers if name in layer.values), None)
    field = fields.get(name)
    if field is None:
        return f"{name}: {message}" if name else message
    if source == "env":
        return f"invalid value for {field.env} (environment): {message}"
    if source == "file":
        return f"invalid value for {field.key} in {config}: {message}"
    return f"invalid value for {field.flag.split('/')[0]}: {message}"


def _commands(f: OptionField) -> str:
    return ", ".join(c for c, scopes in COMMAND_SCOPES.items() if f.option.scope in scopes)


def markdown_table() -> str:
    """Every option as a row of the table in docs/configuration.md."""
    rows = [
        "| option | env var | default | commands | what it does |",
        "|---|---|---|---|---|",
    ]
    for f in options():
        text = (f.option.doc or f.option.help).rstrip(".")
        text = text if text[:2].isupper() else text[:1].lower() + text[1:]
        default = f"`{f.default_text}`" if f.default_text is not None else "none"
        rows.append(f"| `{f.flag}` | `{f.env}` | {default} | {_commands(f)} | {text} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # pragma: no cover - the docs are checked by tests/unit/test_configuration_doc.py
    if sys.argv[1:] != ["--markdown"]:
        raise SystemExit("usage: python -m batchyard.settings_sources --markdown")
    sys.stdout.write(markdown_table())
