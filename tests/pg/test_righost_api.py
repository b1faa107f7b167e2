"""The rig host's control API against its OpenAPI contract, on a live `hilfarm export`.

Schemathesis generates requests from the document the host serves (valid ones, and with its
coverage phase invalid ones: wrong types, values out of range, missing fields) and checks every
answer: no 5xx, status codes and bodies as documented, invalid data refused, and no request
accepted without the token. The path's board is replaced by a real board of the host half the
time, so power, reset and attach really act on a virtual board.
"""

from __future__ import annotations

import base64
import http.client
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_righost import TOKEN, _start_rig

from pytest_hilfarm.services.righost import contract
from pytest_hilfarm.sim import manager

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed: "
                                   "pip install -e '.[test]'")

DOCS = Path(__file__).resolve().parents[2] / "docs" / "righost-openapi.json"
BOARD = "f-esp32-1"


@pytest.fixture(scope="module")
def rig(pg_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("fuzzrig")
    host = _start_rig(tmp, pg_server.new_database(), "rig-f", [(BOARD, "esp32")])
    try:
        yield host
    finally:
        host.proc.terminate()
        try:
            host.proc.wait(10)
        except subprocess.TimeoutExpired:
            host.proc.kill()
        manager.down(host.sim_dir)


def _request(rig: Any, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port = rig.control_url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_the_served_document_is_the_one_in_the_repository(rig: Any) -> None:
    status, headers, body = _request(rig, "GET", "/v1/openapi.json", headers=AUTH)
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert body.decode() == DOCS.read_text(encoding="utf-8") == contract.document_json()
    # ... and it is an OpenAPI 3.1 document schemathesis accepts.
    schema = schemathesis.openapi.from_dict(json.loads(body))
    assert {op.ok().label for op in schema.get_all_operations()} >= {
        "GET /v1/ping", "POST /v1/boards/{board}/flash", "PUT /v1/images/{sha256}"}


def _operations() -> list[tuple[str, str]]:
    found = []
    for path, item in contract.document()["paths"].items():
        for method in item:
            if method in ("get", "head", "put", "post"):
                found.append((method.upper(), path.replace("{board}", BOARD).replace(
                    "{sha256}", "ab" * 32)))
    return found


@pytest.mark.parametrize("credentials", [
    None, "Bearer wrong-token-0123456789",
    "Basic " + base64.b64encode(b"x:" + TOKEN.encode()).decode(),  # Basic: the dashboard's only
    f"Token {TOKEN}", "Bearer"])
def test_every_endpoint_refuses_an_unauthenticated_request(rig: Any, credentials: str | None
                                                           ) -> None:
    operations = _operations() + [("GET", "/v1/nothing-here"), ("DELETE", "/v1/boards")]
    assert len(operations) >= 11
    for method, path in operations:
        headers = {} if credentials is None else {"Authorization": credentials}
        body = b"{}" if method in ("POST", "PUT") else None
        status, answer, raw = _request(rig, method, path, body, headers)
        assert status == 401, (method, path, status, raw)
        assert answer["www-authenticate"].startswith("Bearer"), (method, path)
        if method != "HEAD":
            error = json.loads(raw)
            assert set(error) == {"error", "where", "hint", "kind"}
            assert "Authorization: Bearer" in error["hint"]


@pytest.mark.parametrize(("path", "body", "status", "words"), [
    ("/v1/boards/f-esp32-1/power", b'{"on": "yes"}', 400, "'yes' is not of type 'boolean'"),
    ("/v1/boards/f-esp32-1/power", b'{"cycle": NaN}', 400, "not JSON"),
    ("/v1/boards/f-esp32-1/power", b'{"cycle": 1e308}', 400, "is greater than the maximum"),
    ("/v1/boards/f-esp32-1/power", b'{"on": true, "cycle": 1}', 400, "should not be valid"),
    ("/v1/boards/f-esp32-1/power", b"[1, 2]", 400, "is not of type 'object'"),
    ("/v1/boards/f-esp32-1/power", b'{"on": true', 400, "not JSON"),
    ("/v1/boards/f-esp32-1/power", b'{"lease_id": "\\u0000"}', 400, "lease_id"),
    ("/v1/boards/f-esp32-1/reset", b'{"boot": "sideways"}', 400, "'sideways' is not one of"),
    ("/v1/boards/f-esp32-1/attach", b'{"seconds": -5}', 400, "less than or equal to"),
    ("/v1/boards/f-esp32-1/attach", b'{"seconds": 1, "extra": 2}', 400, "'extra' was unexpected"),
    ("/v1/boards/f-esp32-1/flash", b'{"regions": []}', 400, "should be non-empty"),
    ("/v1/boards/f-esp32-1/flash", json.dumps(
        {"regions": [{"offset": "0x10000", "sha256": "ab" * 32}]}).encode(), 400,
     "at regions[0].offset: '0x10000' is not of type 'integer'"),
    ("/v1/boards/f-esp32-1/flash", json.dumps(
        {"regions": [{"offset": 65536, "sha256": "ab" * 32}]}).encode(), 400,
     "is not in this rig host's cache"),
    ("/v1/boards/nope/power", b"{}", 404, "no board 'nope'"),
    ("/v1/images/xyz", b"abc", 400, "not a SHA-256"),
    ("/v1/images/" + "ab" * 32, b"abc", 400, "do not match the SHA-256"),
])
def test_bad_input_is_a_4xx_in_the_error_shape(rig: Any, path: str, body: bytes, status: int,
                                               words: str) -> None:
    method = "PUT" if "/images/" in path else "POST"
    got, headers, raw = _request(rig, method, path, body,
                                 {**AUTH, "Content-Type": "application/json"})
    error = json.loads(raw)
    assert got == status, error
    assert set(error) == {"error", "where", "hint", "kind"}
    assert words in error["error"], error
    assert error["hint"] and error["where"]


def test_a_non_json_body_is_415_and_an_oversized_one_413(rig: Any) -> None:
    got, _, raw = _request(rig, "POST", f"/v1/boards/{BOARD}/reset", b"boot=flash",
                           {**AUTH, "Content-Type": "application/x-www-form-urlencoded"})
    assert got == 415 and "not JSON" in json.loads(raw)["error"]
    got, _, raw = _request(rig, "POST", f"/v1/boards/{BOARD}/reset", b"{" + b" " * 70000 + b"}",
                           {**AUTH, "Content-Type": "application/json"})
    assert got == 413 and "over the limit" in json.loads(raw)["error"]


SCHEMA = schemathesis.openapi.from_dict(contract.document(), config=schemathesis.Config.from_dict({
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True},
               "fuzzing": {"enabled": True}, "stateful": {"enabled": False}},
    "generation": {"mode": "all", "max-examples": 25, "database": "none"},
    "seed": 17,
}))


@SCHEMA.parametrize()
def test_the_fuzzer_finds_no_500_and_no_contract_violation(case: Any, rig: Any) -> None:
    import random

    from schemathesis.checks import (
        content_type_conformance,
        ignored_auth,
        negative_data_rejection,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    path = case.path_parameters or {}
    if "board" in path and random.Random(repr(case.body)).random() < 0.5:
        path["board"] = BOARD  # act on a real board too, not only on ids that 404
    case.call_and_validate(
        base_url=rig.control_url, headers=AUTH, timeout=60,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                response_schema_conformance, negative_data_rejection, ignored_auth])
