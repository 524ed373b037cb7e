"""The fleet API: every route refuses a request without a valid token (walked from the OpenAPI document), a
read token changes nothing, errors are one JSON line with the right status and never a 500 for bad input;
the TUF repository is served without a token, with byte ranges."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from edgeship.fleet.api import create_app
from edgeship.fleet.models import Audit, Event
from tests.fleet.fleet_fixtures import FleetUnderTest, _fleet
from tests.package_fixtures import Publisher

MakePackage = Callable[..., Path]
OCTETS = {"Content-Type": "application/octet-stream"}


@pytest.fixture
def client(fleet: FleetUnderTest) -> Iterator[TestClient]:
    with TestClient(create_app(fleet.ctx), raise_server_exceptions=False) as test_client:
        yield test_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def routes(client: TestClient, token: str) -> list[tuple[str, str]]:
    """Every (method, path) of the OpenAPI document, path parameters filled in."""
    document = client.get("/openapi.json", headers=bearer(token)).json()
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API token (read or admin role).",
    }
    assert document["security"] == [{"bearer": []}]
    assert document["paths"]["/api/v1/enroll"]["post"]["security"] == []
    fill = {"device_id": "d0", "rollout_id": "1", "package_id": "1", "name": "viewer"}
    out = []
    for path, operations in document["paths"].items():
        concrete = re.sub(r"\{(\w+)\}", lambda m: fill[m.group(1)], path)
        for method in operations:
            out.append((method.upper(), concrete))
    return out


def audit_count(fleet: FleetUnderTest) -> int:
    with fleet.ctx.db.session(readonly=True) as session:
        return int(session.scalar(select(func.count()).select_from(Audit)) or 0)


def test_every_route_refuses_a_request_without_a_valid_token(client: TestClient, fleet: FleetUnderTest):
    walked = routes(client, fleet.read_token)
    assert len(walked) >= 20
    assert not any(path.startswith("/tuf") for _, path in walked)
    for method, path in walked:
        if path == "/api/v1/enroll":
            # Authenticated by the enrollment token in the body instead.
            assert client.request(method, path, json={}).status_code == 422
            answer = client.request(
                method, path, json={"token": "ese_nope", "device_id": "d0", "target": "linux-x86_64"}
            )
            assert answer.status_code == 401 and answer.json()["kind"] == "auth"
            continue
        for headers in ({}, bearer("esf_not-a-token"), {"Authorization": f"Basic {fleet.admin_token}"}):
            answer = client.request(method, path, headers=headers, json={})
            assert answer.status_code == 401, (method, path, headers, answer.text)
            assert answer.json()["kind"] == "auth" and answer.headers["www-authenticate"] == "Bearer"
    assert client.get("/openapi.json").status_code == 401


def test_a_read_token_cannot_change_anything(client: TestClient, fleet: FleetUnderTest):
    before = audit_count(fleet)
    for method, path in routes(client, fleet.read_token):
        if path == "/api/v1/enroll":
            continue
        answer = client.request(method, path, headers=bearer(fleet.read_token), json={})
        if method == "GET" and path not in ("/api/v1/tokens", "/api/v1/enrollment-tokens"):
            assert answer.status_code in (200, 404), (method, path, answer.text)
            continue
        assert answer.status_code == 403, (method, path, answer.text)
        assert answer.json() == {
            "error": "the token 'viewer' is read-only; this needs an admin token",
            "kind": "forbidden",
        }
    # An upload with a read token is refused before its body is read.
    assert (
        client.post("/api/v1/packages", content=b"x" * 1000, headers={**bearer(fleet.read_token), **OCTETS}).status_code
        == 403
    )
    assert audit_count(fleet) == before


def test_bad_input_is_never_a_500(any_fleet: FleetUnderTest):
    # On both databases: a number too large for a column must be refused before SQL sees it.
    with TestClient(create_app(any_fleet.ctx), raise_server_exceptions=False) as client:
        _bad_input_is_never_a_500(client, any_fleet)


def _bad_input_is_never_a_500(client: TestClient, fleet: FleetUnderTest) -> None:
    huge = 10**30
    bodies: list[dict[str, Any]] = [
        {"content": b"{not json"},
        {"content": b"[1, 2]"},
        {"json": {"tags": {"a": 1}, "waves": "nope", "name": 7, "role": "god", "token": None, "gates": [1]}},
        {"json": {"package": "x:1@y", "waves": [10**30], "soak_s": 1e308, "max_per_minute": -1}},
        {"content": "\u00ff\u0000".encode(), "headers": {"Content-Type": "application/json"}},
        {"json": {"package_id": huge, "waves": [1, huge], "max_per_minute": huge, "device_timeout_s": huge}},
        {"json": {"package_id": 1, "waves": [huge], "soak_s": huge, "expires_s": huge, "tags": {'a"b': "x"}}},
    ]
    paths = [
        *routes(client, fleet.admin_token),
        ("GET", "/api/v1/rollouts/not-a-number"),
        ("GET", "/api/v1/devices?online=maybe&limit=0"),
        ("GET", "/api/v1/devices?tag=novalue"),
        ("GET", "/api/v1/audit?limit=100000"),
        ("DELETE", "/api/v1/devices/d0"),
        ("GET", f"/api/v1/rollouts/{huge}"),
        ("POST", f"/api/v1/rollouts/{huge}/pause"),
        ("GET", f"/api/v1/packages/{huge}"),
        ("GET", f"/api/v1/packages?offset={huge}"),
        ("GET", f"/api/v1/devices?offset={huge}&version={huge}"),
        ("GET", f"/api/v1/audit?before_id={huge}"),
        ("GET", f"/api/v1/devices/d0/history?before_id={huge}"),
        ("GET", '/api/v1/devices?tag=a"b=1&tag=$.x=2'),
        ("GET", "/api/v1/devices/" + "x" * 5000),
    ]
    for method, path in paths:
        for body in bodies:
            kwargs = dict(body)
            headers = {**bearer(fleet.admin_token), **kwargs.pop("headers", {})}
            if "content" in kwargs:
                headers.setdefault("Content-Type", "application/json")
            answer = client.request(method, path, headers=headers, **kwargs)
            assert answer.status_code < 500, (method, path, body, answer.text)
            error = answer.json()
            if answer.status_code >= 400:
                assert set(error) == {"error", "kind"} and "\n" not in error["error"], error


def test_packages_over_http(client: TestClient, fleet: FleetUnderTest, make_package: MakePackage, stranger: Publisher):
    admin = {**bearer(fleet.admin_token), **OCTETS}
    path = make_package(version=3)
    answer = client.post("/api/v1/packages?filename=digits.edgepkg", content=path.read_bytes(), headers=admin)
    assert answer.status_code == 201, answer.text
    row = answer.json()
    assert (row["name"], row["version"], row["pushed_by"]) == ("digits-cnn", 3, "token:root")
    refused = client.post(
        "/api/v1/packages?filename=evil.edgepkg",
        content=make_package(version=4, key=stranger.key).read_bytes(),
        headers=admin,
    )
    assert refused.status_code == 422 and refused.json()["kind"] == "package"
    assert refused.json()["error"].startswith("evil.edgepkg: ")
    again = client.post("/api/v1/packages", content=path.read_bytes(), headers=admin)
    assert again.status_code == 409 and again.json()["kind"] == "version"
    assert "not above the current version 3" in again.json()["error"]
    wrong_type = client.post("/api/v1/packages", content=path.read_bytes(), headers=bearer(fleet.admin_token))
    assert wrong_type.status_code == 415
    empty = client.post("/api/v1/packages", content=b"", headers=admin)
    assert empty.status_code == 422 and "empty" in empty.json()["error"]
    listed = client.get("/api/v1/packages", headers=bearer(fleet.read_token)).json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == row["id"]
    assert client.get(f"/api/v1/packages/{row['id']}", headers=bearer(fleet.read_token)).json() == row
    assert client.get("/api/v1/packages/999", headers=bearer(fleet.read_token)).status_code == 404
    assert list(fleet.ctx.settings.uploads_dir.iterdir()) == []


def test_uploads_over_the_cap_are_refused(
    tmp_path: Path, publisher: Publisher, sqlite_url: str, make_package: MakePackage
):
    for small in _fleet(tmp_path, publisher, sqlite_url, http={"max_upload_mib": 0.001}):
        with TestClient(create_app(small.ctx)) as test_client:
            answer = test_client.post(
                "/api/v1/packages", content=make_package().read_bytes(), headers={**bearer(small.admin_token), **OCTETS}
            )
            assert answer.status_code == 413 and answer.json()["kind"] == "too_large"


def test_tuf_files_are_served_without_a_token_with_ranges(
    client: TestClient, fleet: FleetUnderTest, make_package: MakePackage
):
    path = make_package(version=3)
    data = path.read_bytes()
    assert (
        client.post("/api/v1/packages", content=data, headers={**bearer(fleet.admin_token), **OCTETS}).status_code
        == 201
    )
    digest = hashlib.sha256(data).hexdigest()
    url = f"/tuf/targets/digits-cnn/linux-x86_64/fp32/{digest}.v3.edgepkg"
    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["accept-ranges"] == "bytes" and "immutable" in whole.headers["cache-control"]
    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    tail = client.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    resumed = client.get(url, headers={"Range": f"bytes={len(data) - 5}-"})
    assert resumed.status_code == 206 and resumed.content == data[-5:]
    past = client.get(url, headers={"Range": f"bytes={len(data) + 10}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(data)}"
    head = client.head(url)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(data) and head.content == b""
    timestamp = client.get("/tuf/metadata/timestamp.json")
    assert timestamp.status_code == 200 and timestamp.headers["cache-control"] == "no-cache"
    assert json.loads(timestamp.content)["signed"]["_type"] == "timestamp"
    root = client.get("/tuf/metadata/1.root.json")
    assert root.status_code == 200 and "immutable" in root.headers["cache-control"]
    # (httpx removes literal dot segments before sending; encoded ones reach the server.)
    for hidden in (
        "/tuf/metadata/.lock",
        "/tuf/targets/%2e%2e/metadata/1.root.json",
        "/tuf/targets/%2e%2e/%2e%2e/fleet.db",
        "/tuf/other/x",
        "/tuf/targets/digits-cnn",
        "/tuf/metadata/nope.json",
    ):
        assert client.get(hidden).status_code == 404, hidden
    assert client.post("/tuf/metadata/timestamp.json").status_code == 405


def test_devices_over_http(client: TestClient, fleet: FleetUnderTest):
    for i in range(5):
        fleet.add_device(
            f"d{i}", tags={"site": "a" if i < 3 else "b"}, online=i % 2 == 0, model_name="m", model_version=i
        )
    fleet.add_device("phone", target="android-arm64", tags={"site": "a"})
    read = bearer(fleet.read_token)
    listed = client.get("/api/v1/devices", headers=read, params={"tag": "site=a", "limit": 2}).json()
    assert listed["total"] == 4 and [d["id"] for d in listed["items"]] == ["d0", "d1"]
    page2 = client.get("/api/v1/devices", headers=read, params={"tag": "site=a", "limit": 2, "offset": 2}).json()
    assert [d["id"] for d in page2["items"]] == ["d2", "phone"]
    online = client.get("/api/v1/devices", headers=read, params={"online": "true", "target": "linux-x86_64"}).json()
    assert [d["id"] for d in online["items"]] == ["d0", "d2", "d4"]
    assert [d["id"] for d in client.get("/api/v1/devices?version=3", headers=read).json()["items"]] == ["d3"]
    both = client.get("/api/v1/devices", headers=read, params=[("tag", "site=a"), ("tag", "nothing=here")]).json()
    assert both["total"] == 0
    detail = client.get("/api/v1/devices/d3", headers=read).json()
    assert detail["model"] == {"name": "m", "version": 3, "slot": None, "digest": None}
    assert detail["rollouts"] == [] and detail["quarantine"] == []
    missing = client.get("/api/v1/devices/nope", headers=read)
    assert missing.status_code == 404 and missing.json()["kind"] == "not_found"
    with fleet.ctx.db.session() as session:
        for seq in range(3):
            session.add(
                Event(
                    device_id="d3", seq=seq, ts=100.0 + seq, received_at=101.0, event="ota.transition", state="STAGED"
                )
            )
    history = client.get("/api/v1/devices/d3/history?limit=2", headers=read).json()["items"]
    assert [e["seq"] for e in history] == [2, 1]
    patched = client.patch(
        "/api/v1/devices/d3", headers=bearer(fleet.admin_token), json={"tags": {"site": None, "hw": "r3"}}
    )
    assert patched.status_code == 200 and patched.json()["tags"] == {"hw": "r3"}
    bad = client.patch("/api/v1/devices/d3", headers=bearer(fleet.admin_token), json={"tags": {"bad key": "x"}})
    assert bad.status_code == 422 and "tag key" in bad.json()["error"]


def test_tokens_enrollment_tokens_rollouts_and_audit_over_http(
    client: TestClient, fleet: FleetUnderTest, make_package: MakePackage
):
    admin = bearer(fleet.admin_token)
    created = client.post("/api/v1/tokens", headers=admin, json={"name": "ops", "role": "admin"})
    assert created.status_code == 201
    ops = bearer(created.json()["token"])
    listed = client.get("/api/v1/tokens", headers=ops).json()["items"]
    assert [t["name"] for t in listed] == ["root", "viewer", "ops"] and all("token" not in t for t in listed)
    assert client.post("/api/v1/tokens", headers=admin, json={"name": "ops", "role": "read"}).status_code == 409
    assert client.post("/api/v1/tokens", headers=admin, json={"name": "x", "role": "owner"}).status_code == 422
    enroll_token = client.post("/api/v1/enrollment-tokens", headers=ops, json={"tags": {"site": "a"}, "expires_s": 600})
    assert enroll_token.status_code == 201 and enroll_token.json()["token"].startswith("ese_")
    assert client.get("/api/v1/enrollment-tokens", headers=ops).json()["items"][0]["tags"] == {"site": "a"}

    client.post("/api/v1/packages", content=make_package(version=2).read_bytes(), headers={**ops, **OCTETS})
    fleet.add_device("d0")
    body = {"package": "digits-cnn:2@linux-x86_64", "waves": ["50%", "100%"], "gates": {"max_rollback_rate": 0.1}}
    rollout = client.post("/api/v1/rollouts", headers=ops, json=body)
    assert rollout.status_code == 201, rollout.text
    rid = rollout.json()["id"]
    assert rollout.json()["state"] == "pending" and rollout.json()["devices"] == 1
    assert client.post("/api/v1/rollouts", headers=ops, json=body).status_code == 409
    assert client.post(f"/api/v1/rollouts/{rid}/pause", headers=ops).json()["state"] == "paused"
    assert client.post(f"/api/v1/rollouts/{rid}/resume", headers=ops).json()["state"] == "running"
    refused = client.post(f"/api/v1/rollouts/{rid}/approve", headers=ops)
    assert (
        refused.status_code == 409
        and "approve applies to a rollout that is waiting_approval" in refused.json()["error"]
    )
    aborted = client.post(f"/api/v1/rollouts/{rid}/abort", headers=ops, json={"reason": "test"})
    assert aborted.json()["state"] == "aborted" and aborted.json()["halt_reason"] == "aborted by token:ops: test"
    assert client.get("/api/v1/rollouts", headers=bearer(fleet.read_token)).json()["total"] == 1
    none = client.post("/api/v1/rollouts", headers=ops, json={**body, "tags": {"site": "mars"}})
    assert none.status_code == 422 and "no enrolled device matches" in none.json()["error"]

    entries = client.get("/api/v1/audit", headers=bearer(fleet.read_token), params={"actor": "token:ops"}).json()[
        "items"
    ]
    assert [e["action"] for e in entries][:4] == ["rollout.abort", "rollout.resume", "rollout.pause", "rollout.create"]
    assert client.delete("/api/v1/tokens/ops", headers=admin).json()["revoked_at"] is not None
    assert client.get("/api/v1/devices", headers=ops).status_code == 401
    info = client.get("/api/v1/fleet", headers=bearer(fleet.read_token)).json()
    assert info["fleet_id"] == "f1" and info["metadata_url"].endswith("/tuf/metadata/")


def test_enrollment_over_http_works_once(tmp_path: Path, publisher: Publisher, sqlite_url: str):
    accounts = tmp_path / "passwd"
    accounts.write_text("")
    for f in _fleet(tmp_path, publisher, sqlite_url, broker={"accounts_file": str(accounts)}):
        with TestClient(create_app(f.ctx)) as test_client:
            token = test_client.post("/api/v1/enrollment-tokens", headers=bearer(f.admin_token), json={}).json()[
                "token"
            ]
            body = {"token": token, "device_id": "cam-1", "target": "linux-x86_64", "tags": {"site": "a"}}
            first = test_client.post("/api/v1/enroll", json=body)
            assert first.status_code == 201 and first.json()["broker"]["username"] == "cam-1"
            assert accounts.read_text().startswith("cam-1:$7$")
            second = test_client.post("/api/v1/enroll", json={**body, "device_id": "cam-2"})
            assert second.status_code == 401 and "used already" in second.json()["error"]
