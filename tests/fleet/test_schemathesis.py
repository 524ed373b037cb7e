"""schemathesis against the fleet's OpenAPI document, over real HTTP (uvicorn on a free port), on SQLite and
on PostgreSQL: with an admin token no generated request to any route gets a 5xx; without a token (or with a
wrong one) every route refuses with 401, the enrollment route (authenticated by the one-time token in its
body) with 401 or 422.

Examples per route are bounded (``MAX_EXAMPLES``) and derandomized, so a run takes seconds and CI sees the
same requests every time. A longer hunt: ``EDGESHIP_SCHEMATHESIS_EXAMPLES=300 EDGESHIP_SCHEMATHESIS_RANDOM=1``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from edgeship.fleet import auth
from edgeship.fleet.api import ENROLL_PATH
from tests.fleet.fleet_fixtures import ApiServer, FleetUnderTest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install -e '.[dev]')")
from schemathesis.checks import not_a_server_error  # noqa: E402

MAX_EXAMPLES = int(os.environ.get("EDGESHIP_SCHEMATHESIS_EXAMPLES", "20"))
# A name schemathesis will not guess for DELETE /tokens/{name}: the run must not revoke its own token.
ADMIN = "schemathesis-admin-7c1f"


@dataclass
class Target:
    server: ApiServer
    token: str

    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def target(any_fleet: FleetUnderTest) -> Iterator[Target]:
    _row, token = auth.create_token(any_fleet.ctx, ADMIN, "admin", actor="test")
    server = ApiServer(any_fleet.ctx).start()
    try:
        yield Target(server, token)
    finally:
        server.stop()


def operations(target: Target) -> list[Any]:
    """Every operation of the OpenAPI document (which needs a token: it lists what the fleet can do)."""
    schema = schemathesis.openapi.from_url(f"{target.server.url}/openapi.json", headers=target.bearer())
    out = [result.ok() for result in schema.get_all_operations()]
    assert len(out) >= 20
    return out


_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("EDGESHIP_SCHEMATHESIS_RANDOM") != "1",
    database=None,
    suppress_health_check=list(HealthCheck),
)


def run_each(ops: list[Any], check: Callable[[Any], None], config: settings) -> int:
    """Run ``check`` on generated cases of every operation; fail once at the end, listing every operation that failed.

    (Driven from here rather than with ``schema.parametrize()``: the lazy-schema plugin's subtests do not
    work with pytest 9.)
    """
    failed = []
    calls = 0
    for op in ops:

        @given(case=op.as_strategy())
        @config
        def run(case: Any) -> None:
            nonlocal calls
            calls += 1
            check(case)

        try:
            run()
        except BaseException as exc:  # schemathesis raises exception groups; all are reported below
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            failed.append(f"{op.method.upper()} {op.path}: {type(exc).__name__}: {str(exc)[:2000]}")
    assert not failed, "\n\n".join(failed)
    return calls


def test_no_route_answers_5xx_to_an_admin(target: Target) -> None:
    def check(case: Any) -> None:
        case.call_and_validate(headers=target.bearer(), checks=[not_a_server_error], timeout=30)

    ops = operations(target)
    # Not a vacuous pass: most routes take parameters or bodies, so most get several examples.
    n = run_each(ops, check, _SETTINGS)
    assert n >= 5 * len(ops)


def test_no_route_is_usable_without_a_token(target: Target) -> None:
    wrong = ({}, {"Authorization": "Bearer esf_not-a-token"}, {"Authorization": f"Basic {target.token}"})

    def check(case: Any) -> None:
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        for auth_header in wrong:
            response = case.call(headers=auth_header, timeout=30)
            if case.path == ENROLL_PATH:  # authenticated by the one-time token in its body
                assert response.status_code in (401, 422), response.text
            else:
                assert response.status_code == 401, (case.method, case.path, response.status_code, response.text)
                assert response.json()["kind"] == "auth"

    run_each(operations(target), check, settings(_SETTINGS, max_examples=max(3, MAX_EXAMPLES // 5)))


def test_a_nul_character_is_refused_with_422_not_a_500_on_either_database(target: Target) -> None:
    """What schemathesis found on PostgreSQL (which refuses NUL in any text): a NUL in a filter was a 500."""
    import httpx

    with httpx.Client(base_url=target.server.url, headers=target.bearer(), timeout=30) as http:
        for path, params in (
            ("/api/v1/devices", {"model": "a\x00b"}),
            ("/api/v1/packages", {"name": "\x00"}),
            ("/api/v1/audit", {"action": "x\x00"}),
            ("/api/v1/devices/dev%00", {}),
        ):
            answer = http.get(path, params=params)
            assert answer.status_code == 422 and answer.json()["kind"] == "usage", (path, answer.text)
            assert "NUL" in answer.json()["error"]
        for method, path, body in (
            ("POST", "/api/v1/rollouts", {"package": "digits:1@linux-x86_64", "name": "a\x00"}),
            ("POST", "/api/v1/enrollment-tokens", {"tags": {"site": "\x00"}}),
            ("PATCH", "/api/v1/devices/dev-1", {"tags": {"a\x00": "b"}}),
            ("POST", "/api/v1/rollouts/1/abort", {"reason": "\x00"}),
            ("POST", "/api/v1/enroll", {"token": "\x00", "device_id": "d", "target": "t"}),
        ):
            answer = http.request(method, path, json=body)
            assert answer.status_code == 422 and "NUL" in answer.json()["error"], (path, answer.text)
        # Without a token the answer is still 401: authentication comes first.
        assert httpx.get(f"{target.server.url}/api/v1/devices?model=%00").status_code == 401
