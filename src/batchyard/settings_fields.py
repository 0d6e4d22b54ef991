"""The building blocks of the settings model (`batchyard.config`): the `Option` mark that makes a field a
command-line option, env var and TOML key, and the checks of values the field types alone do not say."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

ENV_PREFIX = "BATCHYARD_"
Scope = Literal["execution", "state", "serve", "worker"]
# The options each command takes, by scope: every command that executes batches, those that keep state, serve,
# worker.
COMMAND_SCOPES: dict[str, tuple[Scope, ...]] = {
    "serve": ("execution", "state", "serve"),
    "worker": ("execution", "state", "worker"),
    "run": ("execution",),
    "keys": ("state",),  # `batchyard keys ...` and `batchyard projects ...`: the server's store
}


@dataclass(frozen=True, slots=True)
class Option:
    """Marks a field as a command-line option (and an env var and a TOML key) of the commands of `scope`."""

    scope: Scope
    help: str
    doc: str | None = None  # the docs table's text, where it says more than --help
    flag: str | None = None  # default: --field-name; "--x/--no-x" for an on/off pair
    default_text: str | None = None  # how the default reads in --help and the docs, when not the value itself
    metavar: str | None = None


def parse_route(spec: str) -> tuple[str | None, str]:
    """`URL` routes every model; `MODEL=URL` (glob patterns allowed) routes matching models."""
    pattern: str | None = None
    url = spec
    head, sep, tail = spec.partition("=")
    if sep and "://" not in head:
        pattern, url = head.strip() or None, tail.strip()
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"upstream URL must start with http:// or https://: {url!r}")
    return pattern, url


def _words(value: Any) -> Any:
    """An environment variable holds a repeatable option's values separated by spaces."""
    return value.split() if isinstance(value, str) else value


def _routes(value: Any) -> Any:
    value = _words(value)
    if isinstance(value, list | tuple):
        return [parse_route(v) if isinstance(v, str) else v for v in value]
    return value


def _auto_or_count(maximum: int) -> BeforeValidator:
    def check(value: Any) -> int | None:
        if value is None or value == "auto":
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            n = int(value)
        else:
            raise ValueError(f"{value!r} is neither a number nor 'auto'")
        if not 1 <= n <= maximum:
            raise ValueError(f"{n} is not between 1 and {maximum}")
        return n

    return BeforeValidator(check)


def _existing_file(value: str | None) -> str | None:
    if value is not None and not Path(value).is_file():
        raise ValueError(f"file {value!r} does not exist")
    return value


def _not_a_file(value: Path) -> Path:
    if value.is_file():
        raise ValueError(f"{str(value)!r} is a file, not a directory")
    return value


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("base_url must be an http(s) URL")
    return value


def _models(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Positive = Annotated[float, Field(gt=0)]
RouteList = Annotated[list[tuple[str | None, str]], BeforeValidator(_routes)]
Words = Annotated[list[str], BeforeValidator(_words)]


def _webhook_urls(value: Any) -> Any:
    value = _words(value)
    for url in value if isinstance(value, list | tuple) else ():
        if isinstance(url, str) and not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook URL must start with http:// or https://: {url!r}")
    return value


def _webhook_secret(value: str | None) -> str | None:
    from batchyard.domain.webhooks import secret_key

    if value:
        secret_key(value)  # ValueError for a whsec_ secret that is not base64
    return value
