"""The rig host control API's contract: its OpenAPI 3.1 document and the request body checks.

:data:`OPENAPI` is what ``GET /v1/openapi.json`` serves and what docs/righost-openapi.json holds
(a test keeps them equal; ``python -m pytest_hilfarm.services.righost.contract`` prints it).
:func:`check_body` validates a request body against the same schemas with jsonschema, so the
document and the checks cannot drift apart; a failure is a :class:`UsageError` naming the field.

Must not: act on boards or read files (it only describes and checks).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from functools import cache
from types import MappingProxyType
from typing import Any

from pytest_hilfarm.errors import UsageError
from pytest_hilfarm.services.righost.config import ATTACH_WINDOW_S, MAX_IMAGE_BYTES

API_VERSION = "1.1.0"
# The longest power-off a cycle may ask for: a board with a large bulk capacitor needs a
# second or two; more is a mistake (and would hold the board's UART thread that long).
MAX_CYCLE_S = 10.0
MAX_ATTACH_S = 3600.0
BOARD_ID_PATTERN = "^[A-Za-z0-9._-]{1,128}$"
SHA256_PATTERN = "^[0-9a-fA-F]{64}$"
LEASE_PATTERN = "^[0-9A-Za-z-]{8,64}$"
FLASH_MODES = ("keep", "qio", "qout", "dio", "dout")
FLASH_SIZES = ("keep", "detect", "256KB", "512KB", "1MB", "2MB", "4MB", "8MB", "16MB", "32MB",
               "64MB", "128MB")
FLASH_FREQS = ("keep", "80m", "60m", "48m", "40m", "30m", "26m", "24m", "20m", "16m", "15m",
               "12m")

_ERROR = {"$ref": "#/components/schemas/Error"}
_LEASE = {"type": "string", "pattern": LEASE_PATTERN,
          "description": "the lease that holds the board; refused (409) if it does not now"}


def _json(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": dict(schema)}}}


def _errors(*codes: int) -> dict[str, Any]:
    words = {400: "bad request (the error says which field and what to send)",
             401: "missing or wrong token", 404: "no such board or endpoint",
             409: "the board's UART is in use, or the lease does not hold the board",
             413: "body over the size limit", 415: "body is not JSON",
             502: "the board or its driver failed (a rig fault)"}
    return {str(c): {"description": words[c], **_json(_ERROR)} for c in codes}


def _board_action(summary: str, body: str, ok: Mapping[str, Any], extra: tuple[int, ...] = ()
                  ) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "operationId": summary.split(":")[0].replace(" ", "_"),
        "parameters": [{"$ref": "#/components/parameters/Board"}],
        "requestBody": {"required": False, **_json({"$ref": f"#/components/schemas/{body}"})},
        "responses": {"200": {"description": "done", **_json(ok)},
                      **_errors(400, 401, 404, 409, 415, *extra)},
    }}


_OK = {"$ref": "#/components/schemas/Ok"}

_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "hilfarm rig host control API",
        "version": API_VERSION,
        "description": "Power, reset, attach and the content-addressed flash path of the boards "
        "one rig host (`hilfarm export`) serves. Every endpoint needs the shared token "
        "(`Authorization: Bearer`) or, when the host requires them, a TLS client certificate. "
        "Errors are `{error, where, hint, kind}`; `kind` names the error class.",
    },
    "security": [{"bearerToken": []}, {"clientCertificate": []}],
    "paths": {
        "/v1/ping": {"get": {
            "summary": "liveness: the host's name",
            "operationId": "ping",
            "responses": {"200": {"description": "alive", **_json({
                "type": "object", "required": ["host"],
                "properties": {"host": {"type": "string"}}})},
                **_errors(401)},
        }},
        "/v1/openapi.json": {"get": {
            "summary": "this document",
            "operationId": "openapi",
            "responses": {"200": {"description": "the OpenAPI document",
                                  **_json({"type": "object"})}, **_errors(401)},
        }},
        "/v1/boards": {"get": {
            "summary": "the boards this host serves and who uses each UART now",
            "operationId": "boards",
            "responses": {"200": {"description": "the boards", **_json(
                {"$ref": "#/components/schemas/Boards"})}, **_errors(401)},
        }},
        "/v1/images/{sha256}": {
            "parameters": [{"name": "sha256", "in": "path", "required": True,
                            "description": "SHA-256 of the image's bytes, in hex",
                            "schema": {"type": "string", "pattern": SHA256_PATTERN}}],
            "head": {
                "summary": "whether the image is cached",
                "operationId": "has_image",
                "responses": {"200": {"description": "cached"},
                              "400": {"description": "not a SHA-256 hex digest"},
                              "401": {"description": "missing or wrong token"},
                              "404": {"description": "not cached"}},
            },
            "put": {
                "summary": "upload an image (content-addressed)",
                "operationId": "put_image",
                "requestBody": {"required": True, "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary",
                               "maxLength": MAX_IMAGE_BYTES}}}},
                "responses": {
                    "200": {"description": "already cached", **_json(
                        {"$ref": "#/components/schemas/Stored"})},
                    "201": {"description": "stored", **_json(
                        {"$ref": "#/components/schemas/Stored"})},
                    **_errors(400, 401, 413),
                },
            },
        },
        "/v1/boards/{board}/flash": _board_action(
            "flash: write images the host has cached, with esptool on its local port",
            "FlashRequest", {"$ref": "#/components/schemas/FlashReport"}, (502,)),
        "/v1/boards/{board}/power": _board_action(
            "power: switch on or off, or cycle", "PowerRequest", _OK, (502,)),
        "/v1/boards/{board}/reset": _board_action(
            "reset: into the app (flash) or the ROM loader (download)", "ResetRequest", _OK,
            (502,)),
        "/v1/boards/{board}/attach": _board_action(
            "attach: let the caller's address open the board's RFC 2217 port",
            "AttachRequest", {"$ref": "#/components/schemas/Attached"}),
    },
    "components": {
        "securitySchemes": {
            "bearerToken": {"type": "http", "scheme": "bearer",
                            "description": "the shared token of `hilfarm export --token-file`"},
            "clientCertificate": {"type": "mutualTLS",
                                  "description": "a client certificate signed by "
                                  "`--tls-client-ca`"},
        },
        "parameters": {
            "Board": {"name": "board", "in": "path", "required": True,
                      "description": "a board id of this host's rack",
                      "schema": {"type": "string", "pattern": BOARD_ID_PATTERN}},
        },
        "schemas": {
            "Error": {"type": "object", "required": ["error", "where", "hint", "kind"],
                      "properties": {"error": {"type": "string"}, "where": {"type": "string"},
                                     "hint": {"type": "string"}, "kind": {"type": "string"}}},
            "Ok": {"type": "object", "required": ["ok"],
                   "properties": {"ok": {"const": True}}},
            "Stored": {"type": "object", "required": ["sha256", "stored"],
                       "properties": {"sha256": {"type": "string", "pattern": SHA256_PATTERN},
                                      "stored": {"type": "boolean"}}},
            "Boards": {"type": "object", "required": ["host", "boards"], "properties": {
                "host": {"type": "string"},
                "boards": {"type": "array", "items": {
                    "type": "object",
                    "required": ["id", "chip", "features", "rfc2217", "in_use_by"],
                    "properties": {"id": {"type": "string"}, "chip": {"type": "string"},
                                   "features": {"type": "array",
                                                "items": {"type": "string"}},
                                   "rfc2217": {"type": "string"},
                                   "in_use_by": {"type": "string"}}}}}},
            "Attached": {"type": "object", "required": ["rfc2217", "address", "seconds"],
                         "properties": {"rfc2217": {"type": "string"},
                                        "address": {"type": "string"},
                                        "seconds": {"type": "number"}}},
            "FlashReport": {"type": "object",
                            "required": ["port", "chip", "seconds", "baud", "regions"],
                            "properties": {
                                "port": {"type": "string"}, "chip": {"type": "string"},
                                "seconds": {"type": "number"}, "baud": {"type": "integer"},
                                "regions": {"type": "array", "items": {
                                    "type": "object",
                                    "required": ["offset", "size", "sha256", "name", "written",
                                                 "seconds"],
                                    "properties": {
                                        "offset": {"type": "integer"},
                                        "size": {"type": "integer"},
                                        "sha256": {"type": "string"},
                                        "name": {"type": "string"},
                                        "written": {"type": "boolean"},
                                        "seconds": {"type": "number"}}}}}},
            "FlashRequest": {
                "type": "object", "additionalProperties": False, "required": ["regions"],
                "properties": {
                    "regions": {"type": "array", "minItems": 1, "maxItems": 16, "items": {
                        "type": "object", "additionalProperties": False,
                        "required": ["offset", "sha256"],
                        "properties": {
                            "offset": {"type": "integer", "minimum": 0,
                                       "maximum": 0x7FFFFFFF},
                            "sha256": {"type": "string", "pattern": SHA256_PATTERN},
                            "name": {"type": "string", "maxLength": 256}}}},
                    "flash_mode": {"enum": list(FLASH_MODES)},
                    "flash_size": {"enum": list(FLASH_SIZES)},
                    "flash_freq": {"enum": list(FLASH_FREQS)},
                    "baud": {"type": ["integer", "null"], "minimum": 9600,
                             "maximum": 5000000},
                    "skip_identical": {"type": "boolean"},
                    "boot": {"type": "boolean"},
                    "lease_id": _LEASE,
                }},
            "PowerRequest": {
                "type": "object", "additionalProperties": False,
                "description": "`on` (default true), or `cycle`: seconds off, then on",
                "properties": {"on": {"type": "boolean"},
                               "cycle": {"type": "number", "minimum": 0,
                                         "maximum": MAX_CYCLE_S},
                               "lease_id": _LEASE},
                "dependentSchemas": {"cycle": {"not": {"required": ["on"]}}}},
            "ResetRequest": {
                "type": "object", "additionalProperties": False,
                "properties": {"boot": {"enum": ["flash", "download"]}, "lease_id": _LEASE}},
            "AttachRequest": {
                "type": "object", "additionalProperties": False,
                "properties": {"seconds": {"type": "number", "exclusiveMinimum": 0,
                                           "maximum": MAX_ATTACH_S,
                                           "default": ATTACH_WINDOW_S},
                               "lease_id": _LEASE}},
        },
    },
}


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


OPENAPI: Mapping[str, Any] = _freeze(_DOCUMENT)


def document() -> dict[str, Any]:
    """A fresh, mutable copy of the OpenAPI document (as JSON would give it)."""
    return json.loads(document_json())


@cache
def document_json() -> str:
    """The document as served and as kept in docs/righost-openapi.json."""
    return json.dumps(_DOCUMENT, indent=2, sort_keys=True) + "\n"


@cache
def _validator(schema_name: str) -> Any:
    from jsonschema import Draft202012Validator

    root = {"$ref": f"#/components/schemas/{schema_name}",
            "components": json.loads(document_json())["components"]}
    return Draft202012Validator(root)


def check_body(schema_name: str, body: Any, *, where: str) -> None:
    """Raise a UsageError naming the field if ``body`` does not fit the schema."""
    from jsonschema.exceptions import best_match

    error = best_match(_validator(schema_name).iter_errors(body))
    if error is None:
        return
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    raise UsageError(
        f"bad request body{' at ' + field.lstrip('.') if field else ''}: {error.message}",
        where=where,
        hint=f"send a JSON object as the {schema_name} schema says "
        "(GET /v1/openapi.json, or docs/righost-openapi.json)",
    )


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(document_json())
