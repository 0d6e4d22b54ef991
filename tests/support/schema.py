"""JSON Schema validators built from the reference OpenAPI document and the batch line schemas.

The OpenAPI 3 schemas are turned into Draft 2020-12 JSON Schema:

- ``$ref: #/components/schemas/X`` becomes ``$ref: #/$defs/X``;
- ``nullable: true`` becomes ``anyOf: [<schema>, {type: null}]``;
- every *optional* property (declared, but not listed in its object's ``required``) also accepts ``null``:
  the OpenAI API answers ``null`` for unset optional fields (``output_file_id``, ``expires_at``,
  ``status_details``, ...), which the spec leaves out; required properties stay as strict as the spec says;
- ``additionalProperties`` is left exactly as in the spec; ``x-*`` extensions, ``example`` and ``format``
  (``unixtime``, ``binary``) are annotations and are ignored by the validator.

Use :func:`validate` (raises ``AssertionError`` listing every violation) and :func:`spec_properties`.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

OPENAPI_FILE = "openai-batch-files-uploads.openapi.json"
LINES_FILE = "batch-request-io.schema.json"

_NULL = {"type": "null"}
_COMPONENTS = "#/components/schemas/"


def _reference_dir() -> Path:
    """tests/reference (a copy kept in the repository), else a `shared/reference` beside or inside it."""
    repo = Path(__file__).resolve().parents[2]
    for cand in (
        repo / "tests" / "reference",
        repo / "shared" / "reference",
        repo.parent / "shared" / "reference",
    ):
        if (cand / OPENAPI_FILE).is_file():
            return cand
    raise FileNotFoundError(f"reference schemas not found near {repo}")


def _nullable(schema: Any) -> dict[str, Any]:
    if isinstance(schema, dict) and schema.get("type") == "null":
        return schema
    return {"anyOf": [schema, dict(_NULL)]}


def convert(node: Any) -> Any:
    """Convert one OpenAPI 3.x schema (and everything below it) to Draft 2020-12."""
    if isinstance(node, list):
        return [convert(x) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str) and value.startswith(_COMPONENTS):
            out[key] = "#/$defs/" + value[len(_COMPONENTS) :]
        elif key == "nullable":
            continue
        elif key == "properties" and isinstance(value, dict):
            required = set(node.get("required", ()))
            out[key] = {
                name: convert(prop) if name in required else _nullable(convert(prop))
                for name, prop in value.items()
            }
        else:
            out[key] = convert(value)
    if node.get("nullable") is True:
        return _nullable(out)
    return out


@cache
def _raw() -> tuple[dict[str, Any], dict[str, Any]]:
    ref = _reference_dir()
    spec = json.loads((ref / OPENAPI_FILE).read_text())
    lines = json.loads((ref / LINES_FILE).read_text())
    return spec["components"]["schemas"], lines


@cache
def _defs() -> dict[str, Any]:
    components, lines = _raw()
    defs = {name: convert(s) for name, s in components.items()}
    for name, s in lines.items():
        if name in defs:
            raise AssertionError(f"schema name {name} defined twice")
        defs[name] = convert(s)
    return defs


@cache
def validator(name: str) -> Draft202012Validator:
    """A validator for the component (or line) schema ``name``."""
    defs = _defs()
    if name not in defs:
        raise KeyError(f"no schema {name!r}; known: {sorted(defs)}")
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": f"#/$defs/{name}",
        "$defs": defs,
    }
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def errors(name: str, instance: Any) -> list[str]:
    """Every violation of ``name`` by ``instance``, as readable strings (empty when valid)."""
    found = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found]


def validate(name: str, instance: Any) -> None:
    problems = errors(name, instance)
    if problems:
        raise AssertionError(f"response does not conform to {name}:\n  " + "\n  ".join(problems))


def spec_properties(name: str) -> set[str]:
    """The property names the spec (unconverted) declares for component ``name``."""
    components, lines = _raw()
    schema = components.get(name) or lines[name]
    return set(schema.get("properties", {}))


def spec_required(name: str) -> set[str]:
    components, lines = _raw()
    schema = components.get(name) or lines[name]
    return set(schema.get("required", ()))
