"""The dashboard over real HTTP (uvicorn on a free port, httpx): login into a signed HttpOnly, SameSite=Strict
cookie; CSRF refusal on every POST; a revoked token logged out; read-only sessions that cannot act; keyset
pages; the rollout page showing gate values against thresholds and the halt reason."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import select

from edgeship.fleet import alerts, auth
from edgeship.fleet.dashboard.queries import bar_segments, gate_rows
from edgeship.fleet.dashboard.sessions import SESSION_TTL_S, SessionSigner, load_secret
from edgeship.fleet.models import Audit, Rollout
from edgeship.fleet.rollout_logic import Gates
from tests.fleet.dashboard_fixtures import device_id, seed_devices, seed_halted_rollout
from tests.fleet.fleet_fixtures import ApiServer, FleetUnderTest

D = "/dashboard"


@pytest.fixture
def server(fleet: FleetUnderTest) -> Iterator[ApiServer]:
    srv = ApiServer(fleet.ctx).start()
    try:
        yield srv
    finally:
        srv.stop()


def client(server: ApiServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, follow_redirects=False, timeout=20)


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]*)"', page)
    assert match, "the page has no CSRF field"
    return match.group(1)


def login(http: httpx.Client, token: str) -> httpx.Response:
    form = http.get(f"{D}/login")
    assert form.status_code == 200
    return http.post(f"{D}/login", data={"token": token, "csrf": csrf_of(form.text), "next": f"{D}/"})


def rollout_state(fleet: FleetUnderTest, rollout_id: int) -> str:
    with fleet.ctx.db.session(readonly=True) as session:
        return session.get(Rollout, rollout_id).state  # type: ignore[union-attr]


def test_login_puts_the_token_in_an_httponly_samesite_strict_cookie(fleet: FleetUnderTest, server: ApiServer):
    with client(server) as http:
        first = http.get(f"{D}/")
        assert first.status_code == 303 and first.headers["location"] == f"{D}/login?next=%2Fdashboard%2F"
        assert http.get("/").headers["location"] == f"{D}/"
        form = http.get(f"{D}/login")
        pre = form.headers["set-cookie"]
        assert pre.startswith("edgeship_login=") and "HttpOnly" in pre and "SameSite=strict" in pre
        answer = http.post(f"{D}/login", data={"token": fleet.admin_token, "csrf": csrf_of(form.text), "next": f"{D}/"})
        assert answer.status_code == 303 and answer.headers["location"] == f"{D}/"
        cookies = answer.headers.get_list("set-cookie")
        session = next(c for c in cookies if c.startswith("edgeship_session="))
        attrs = {part.strip().split("=")[0].lower(): part.strip() for part in session.split(";")[1:]}
        assert "httponly" in attrs and attrs["samesite"] == "SameSite=strict"
        assert attrs["path"] == "Path=/dashboard" and attrs["max-age"] == f"Max-Age={SESSION_TTL_S}"
        assert "secure" not in attrs  # plain HTTP here; set when the request came over HTTPS
        # The token itself is not in the cookie, only its id and a signature.
        assert fleet.admin_token not in session
        page = http.get(f"{D}/")
        assert page.status_code == 200 and "Fleet overview" in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
        assert page.headers["server-timing"].startswith("app;dur=")
        # Everything the page loads comes from this server.
        for src in re.findall(r'(?:src|href)="([^"]+)"', page.text):
            assert src.startswith(("/", "?", "data:")), src
    with fleet.ctx.db.session(readonly=True) as db:
        assert db.scalar(select(Audit.actor).where(Audit.action == "dashboard.login")) == "token:root"


def test_login_refuses_a_wrong_token_a_missing_csrf_token_and_a_foreign_next(fleet: FleetUnderTest, server: ApiServer):
    with client(server) as http:
        wrong = login(http, "esf_not-a-token")
        assert wrong.status_code == 401 and "edgeship_session" not in wrong.headers.get("set-cookie", "")
        assert "the token is not valid" in html.unescape(wrong.text)
        http.get(f"{D}/login")
        no_csrf = http.post(f"{D}/login", data={"token": fleet.admin_token})
        assert no_csrf.status_code == 403 and "edgeship_session" not in no_csrf.headers.get("set-cookie", "")
    with client(server) as http:  # no pre-login cookie at all: a form posted from elsewhere
        assert http.post(f"{D}/login", data={"token": fleet.admin_token, "csrf": "x"}).status_code == 403
    with client(server) as http:
        form = http.get(f"{D}/login")
        answer = http.post(
            f"{D}/login", data={"token": fleet.admin_token, "csrf": csrf_of(form.text), "next": "https://evil.example/"}
        )
        assert answer.status_code == 303 and answer.headers["location"] == f"{D}/"


def test_every_post_needs_the_csrf_token_of_its_own_session(fleet: FleetUnderTest, server: ApiServer):
    ids = seed_devices(fleet.ctx, 30, now=fleet.clock.now)
    rid = seed_halted_rollout(fleet.ctx, ids, now=fleet.clock.now)
    with client(server) as other:
        login(other, fleet.admin_token)
        foreign = csrf_of(other.get(f"{D}/rollouts/{rid}").text)
    with client(server) as http:
        assert login(http, fleet.admin_token).status_code == 303
        page = http.get(f"{D}/rollouts/{rid}")
        assert 'id="btn-abort"' in page.text
        for data in ({}, {"csrf": ""}, {"csrf": "0" * 64}, {"csrf": foreign}):
            refused = http.post(f"{D}/rollouts/{rid}/abort", data=data)
            assert refused.status_code == 403, data
            assert "did not come from this dashboard" in html.unescape(refused.text)
        assert http.post(f"{D}/logout", data={}).status_code == 403
        # JSON is not a form: refused, never parsed.
        assert http.post(f"{D}/rollouts/{rid}/abort", json={"csrf": csrf_of(page.text)}).status_code == 415
        assert rollout_state(fleet, rid) == "rolling_back"
        done = http.post(f"{D}/rollouts/{rid}/abort", data={"csrf": csrf_of(page.text), "reason": "seen enough"})
        assert done.status_code == 303 and done.headers["location"] == f"{D}/rollouts/{rid}?done=abort"
        assert rollout_state(fleet, rid) == "aborted"
        again = http.post(f"{D}/rollouts/{rid}/abort", data={"csrf": csrf_of(page.text)})
        assert again.status_code == 409 and "abort applies to a rollout that is" in html.unescape(again.text)
        out = http.post(f"{D}/logout", data={"csrf": csrf_of(page.text)})
        assert out.status_code == 303 and 'edgeship_session=""' in out.headers["set-cookie"]
        assert http.get(f"{D}/").status_code == 303
    with fleet.ctx.db.session(readonly=True) as db:
        entry = db.scalars(select(Audit).where(Audit.action == "rollout.abort")).one()
        assert entry.actor == "token:root" and entry.details["reason"] == "seen enough"


def test_a_read_only_session_sees_no_buttons_and_cannot_act(fleet: FleetUnderTest, server: ApiServer):
    ids = seed_devices(fleet.ctx, 20, now=fleet.clock.now)
    rid = seed_halted_rollout(fleet.ctx, ids, now=fleet.clock.now)
    with client(server) as http:
        login(http, fleet.read_token)
        page = http.get(f"{D}/rollouts/{rid}")
        assert page.status_code == 200 and "Halted:" in page.text
        assert 'id="actions"' not in page.text and "btn-abort" not in page.text
        for op in ("abort", "pause", "resume", "approve"):
            answer = http.post(f"{D}/rollouts/{rid}/{op}", data={"csrf": csrf_of(page.text)})
            assert answer.status_code == 403 and "is read-only" in html.unescape(answer.text)
        assert rollout_state(fleet, rid) == "rolling_back"


def test_a_revoked_token_logs_its_sessions_out(fleet: FleetUnderTest, server: ApiServer):
    with client(server) as http:
        login(http, fleet.read_token)
        assert http.get(f"{D}/").status_code == 200
        auth.revoke_token(fleet.ctx, "viewer", actor="test")
        answer = http.get(f"{D}/rollouts")
        assert answer.status_code == 303
        assert answer.headers["location"] == f"{D}/login?next=%2Fdashboard%2Frollouts&reason=revoked"
        assert 'edgeship_session=""' in answer.headers["set-cookie"]  # the browser drops it
        shown = http.get(answer.headers["location"])
        assert "the token of your session was revoked" in html.unescape(shown.text)
        # The login page shows fixed texts only: a crafted link cannot put words in its mouth.
        assert "paste it at" not in http.get(f"{D}/login", params={"reason": "paste it at evil"}).text
        assert login(http, fleet.read_token).status_code == 401


def test_a_forged_or_expired_session_cookie_is_refused(fleet: FleetUnderTest, server: ApiServer):
    with client(server) as http:
        login(http, fleet.admin_token)
        value = http.cookies["edgeship_session"]
        token_id = value.split(":")[1]
        # Another token's id under the same signature: the MAC no longer matches.
        forged = value.replace(f"v1:{token_id}:", "v1:2:", 1)
        http.cookies.set("edgeship_session", forged, domain="127.0.0.1", path="/dashboard")
        assert http.get(f"{D}/").status_code == 303
        http.cookies.set("edgeship_session", value, domain="127.0.0.1", path="/dashboard")
        assert http.get(f"{D}/").status_code == 200
        fleet.clock.advance(SESSION_TTL_S + 1)
        expired = http.get(f"{D}/")
        assert expired.status_code == 303 and expired.headers["location"].endswith("&reason=expired")
        # A form posted without a session comes back to the overview after logging in, not to the action.
        posted = http.post(f"{D}/rollouts/1/abort", data={"csrf": "x"})
        assert posted.status_code == 303 and posted.headers["location"] == f"{D}/login?next=%2Fdashboard%2F"


def test_the_device_list_pages_by_key_and_filters(fleet: FleetUnderTest, server: ApiServer):
    seed_devices(fleet.ctx, 120, now=fleet.clock.now)
    fleet.add_device("dev_x%1")  # LIKE wildcards in a prefix search match themselves only

    def listed(text: str) -> list[str]:
        table = text.split('id="devices"')[1].split("</table>")[0]
        return re.findall(r'href="/dashboard/devices/([^"]+)"', table)

    with client(server) as http:
        login(http, fleet.read_token)
        first = http.get(f"{D}/")
        assert 'id="count-total">121<' in first.text and 'id="count-offline">' in first.text
        assert listed(first.text) == [device_id(i) for i in range(50)]
        assert 'rel="prev"' not in first.text
        second = http.get(f"{D}/", params={"after": device_id(49)})
        assert listed(second.text) == [device_id(i) for i in range(50, 100)]
        third = http.get(f"{D}/", params={"after": device_id(99)})
        assert listed(third.text) == [device_id(i) for i in range(100, 120)] + ["dev_x%251"]
        assert 'rel="next"' not in third.text
        back = http.get(f"{D}/", params={"before": device_id(100)})
        assert listed(back.text) == [device_id(i) for i in range(50, 100)]
        assert f'href="/dashboard/?before={device_id(50)}"' in back.text
        offline = listed(http.get(f"{D}/", params={"status": "offline"}).text)
        assert offline[:3] == [device_id(0), device_id(7), device_id(14)]
        pager = http.get(f"{D}/", params={"status": "offline", "after": device_id(0)}).text
        assert listed(pager)[0] == device_id(7)
        assert listed(http.get(f"{D}/", params={"q": "dev_x%"}).text) == ["dev_x%251"]
        assert listed(http.get(f"{D}/", params={"q": "dev-0011"}).text) == [device_id(i) for i in range(110, 120)]


def test_the_rollout_page_shows_gates_against_thresholds_and_why_it_halted(fleet: FleetUnderTest, server: ApiServer):
    ids = seed_devices(fleet.ctx, 40, now=fleet.clock.now)
    rid = seed_halted_rollout(fleet.ctx, ids, now=fleet.clock.now)
    with client(server) as http:
        login(http, fleet.admin_token)
        page = http.get(f"{D}/rollouts/{rid}")
        text = html.unescape(re.sub(r"<[^>]+>", " ", page.text))
        assert "wave 1: latency_p99_ratio 3.1 breaches 2" in text
        gates = page.text.split('id="gates-wave-1"')[1].split("</table>")[0]
        row = re.search(
            r'<tr class="breached">\s*<td>latency_p99_ratio</td><td class="n">3.1</td>\s*<td class="n">max 2</td>',
            gates,
        )
        assert row, gates
        assert gates.count('class="breached"') == 1  # the others hold or are off
        assert "no outcome within 900 s" in page.text  # the device that did not make it, with its reason
        listing = http.get(f"{D}/rollouts").text
        assert f'href="/dashboard/rollouts/{rid}"' in listing and "rolling_back" in listing
        assert http.get(f"{D}/rollouts/999").status_code == 404
        assert http.get(f"{D}/rollouts/x'1").status_code == 404


def test_the_device_page_embeds_its_telemetry_as_chart_series(fleet: FleetUnderTest, server: ApiServer):
    seed_devices(fleet.ctx, 3, telemetry_per_device=25, now=fleet.clock.now)
    with client(server) as http:
        login(http, fleet.read_token)
        page = http.get(f"{D}/devices/{device_id(1)}")
        assert page.status_code == 200
        charts = [
            json.loads(m)
            for m in re.findall(r'<script type="application/json" class="chart-data">(.*?)</script>', page.text)
        ]
        assert [c["title"] for c in charts] == ["latency", "errors", "drift (PSI)", "CPU", "RSS", "temperature"]
        latency = {s["name"]: s["points"] for s in charts[0]["series"]}
        assert len(latency["p50"]) == len(latency["p99"]) == 25
        assert [p[0] for p in latency["p99"]] == sorted(p[0] for p in latency["p99"])  # oldest first
        assert http.get(f"{D}/devices/nope").status_code == 404


def test_session_cookies_and_csrf_tokens_are_tied_to_their_secret(tmp_path):
    secret = load_secret(tmp_path)
    assert load_secret(tmp_path) == secret and (tmp_path / "dashboard-session.key").stat().st_mode & 0o777 == 0o600
    signer, other = SessionSigner(secret), SessionSigner(b"x" * 32)
    cookie = signer.issue(7, "ab" * 32, now=1000.0)
    claims = signer.verify(cookie, now=1001.0)
    assert claims is not None and claims.token_id == 7
    assert other.verify(cookie, now=1001.0) is None
    assert signer.verify(cookie, now=1000.0 + SESSION_TTL_S) is None
    assert signer.verify(cookie[:-1] + ("0" if cookie[-1] != "0" else "1"), now=1001.0) is None
    assert signer.check_csrf(claims, signer.csrf_token(claims))
    again = signer.verify(signer.issue(7, "ab" * 32, now=1000.0), now=1001.0)
    assert again is not None and not signer.check_csrf(again, signer.csrf_token(claims))  # one token per session


def test_gate_rows_judge_like_the_scheduler():
    gates = Gates(max_latency_p99_ratio=2.0, max_drift_psi=None, min_shadow_agreement=0.9).to_json()
    rows = {r.gate: r for r in gate_rows(gates, {"latency_p99_ratio": 2.5, "drift_psi": 9.0, "shadow_agreement": 0.95})}
    assert rows["latency_p99_ratio"].breached and rows["latency_p99_ratio"].bound == "max"
    assert not rows["drift_psi"].breached and rows["drift_psi"].threshold is None
    assert not rows["shadow_agreement"].breached and rows["shadow_agreement"].bound == "min"
    assert rows["install_failure_rate"].value is None and not rows["install_failure_rate"].breached
    segments = bar_segments({"pending": 1, "COMMITTED": 2, "weird": 1}, 4)
    assert [(s["state"], s["x"], s["width"]) for s in segments] == [
        ("COMMITTED", 0.0, 50.0),
        ("pending", 50.0, 25.0),
        ("weird", 75.0, 25.0),
    ]


def test_the_overview_and_the_alerts_page_show_the_open_alerts(fleet: FleetUnderTest, server: ApiServer):
    ids = seed_devices(fleet.ctx, 14, now=fleet.clock.now)  # dev-00000 and dev-00007 are offline for an hour
    rid = seed_halted_rollout(fleet.ctx, ids, now=fleet.clock.now)
    changes = alerts.evaluate(fleet.ctx.db.session, fleet.ctx.settings.alerts, fleet.clock.now)
    assert len(changes) == 3
    with client(server) as http:
        login(http, fleet.read_token)
        page = http.get(f"{D}/").text
        assert 'id="count-alerts">3<' in page
        table = page.split('id="alerts"')[1].split("</table>")[0]
        assert f'href="/dashboard/rollouts/{rid}">rollout/{rid}</a>' in table
        assert 'href="/dashboard/devices/dev-00007">device/dev-00007</a>' in table
        assert "rollout_halted" in table and "critical" in table
        listing = http.get(f"{D}/alerts").text
        assert listing.count('<tr class="sev-') == 3
        assert "device_offline" in http.get(f"{D}/alerts", params={"all": "1"}).text


def test_nul_characters_in_urls_and_forms_are_no_500_on_either_database(any_fleet: FleetUnderTest):
    # PostgreSQL refuses NUL in any text; the pages must not hand one to it.
    ids = seed_devices(any_fleet.ctx, 5, now=any_fleet.clock.now)
    rid = seed_halted_rollout(any_fleet.ctx, ids, now=any_fleet.clock.now)
    server = ApiServer(any_fleet.ctx).start()
    try:
        with client(server) as http:
            login(http, any_fleet.admin_token)
            assert http.get(f"{D}/devices/dev%00x").status_code == 404
            assert http.get(f"{D}/", params={"q": "dev\x00", "after": "a\x00"}).status_code == 200
            assert http.get(f"{D}/rollouts", params={"state": "x\x00"}).status_code == 200
            page = http.get(f"{D}/rollouts/{rid}")
            done = http.post(f"{D}/rollouts/{rid}/abort", data={"csrf": csrf_of(page.text), "reason": "a\x00b"})
            assert done.status_code == 303 and rollout_state(any_fleet, rid) == "aborted"
        with client(server) as http:
            assert login(http, "esf_\x00").status_code == 401
    finally:
        server.stop()


def test_an_admin_pauses_and_resumes_a_running_rollout(fleet: FleetUnderTest, server: ApiServer):
    ids = seed_devices(fleet.ctx, 20, now=fleet.clock.now)
    rid = seed_halted_rollout(fleet.ctx, ids, now=fleet.clock.now)
    with fleet.ctx.db.session() as db:
        row = db.get(Rollout, rid)
        assert row is not None
        row.state, row.halt_reason = "running", None
    with client(server) as http:
        login(http, fleet.admin_token)
        page = http.get(f"{D}/rollouts/{rid}").text
        buttons = re.findall(r'id="btn-(\w+)"', page)
        assert buttons == ["pause", "abort"]  # the operations that apply to a running rollout
        assert http.post(f"{D}/rollouts/{rid}/pause", data={"csrf": csrf_of(page)}).status_code == 303
        assert rollout_state(fleet, rid) == "paused"
        page = http.get(f"{D}/rollouts/{rid}?done=pause").text
        assert re.findall(r'id="btn-(\w+)"', page) == ["resume", "abort"] and "pause: done." in page
        assert http.post(f"{D}/rollouts/{rid}/resume", data={"csrf": csrf_of(page)}).status_code == 303
        assert rollout_state(fleet, rid) == "running"
        assert http.post(f"{D}/rollouts/{rid}/reboot", data={"csrf": csrf_of(page)}).status_code == 404
