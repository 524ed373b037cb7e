"""Fleet at scale on this machine: a rollout to N simulated devices, and sustained QoS 1 telemetry into PostgreSQL.

Every part is real and runs as its own process: mosquitto (its own, on a free port, configured by
``fleet.broker`` with unlimited queues), ``edgeship fleet serve --no-ingest`` (API, scheduler) and
``--ingest-processes`` (2) ``edgeship fleet ingest`` processes on a fresh PostgreSQL database at
127.0.0.1:5432 (dropped at the end), ``python -m edgeship.fleet.simulator`` holding every device's MQTT
session in one asyncio process for the rollouts, and ``python -m edgeship.fleet.telemetry_load`` (the
same telemetry messages over thin MQTT 5 framing, 6x less CPU per message) for (b). Devices are
enrolled in bulk (``edgeship fleet import-devices``).

(a) rollout: every device starts on v1; v2 is rolled out in waves 1%, 10%, 50%, 100% with soak 0 until
    every device reports COMMITTED. Prints the time per wave and in all, against AWS IoT Jobs' cap of
    1,000 devices a minute.
(b) telemetry: the devices send QoS 1 telemetry at ``--rate`` messages/s for ``--duration`` seconds; the
    database is then checked by sequence number (messages lost, gaps); ingest lag, the fleet process's
    RSS and CPU and the database size are printed.
(c) bad rollout (after a; ``--skip-bad-rollout``): v3, whose simulated p99 latency is ``--bad-p99-ms`` (30 ms against
    6 ms), in waves 1%, 10%, 50%, 100% with soak ``--bad-soak`` (60 s): the latency gate must halt it during wave 1's
    soak (early halt, once half of the wave has reported) and the fleet roll wave 1 back (signed downgrade). Prints the time from creation to halted and to rolled_back,
    the halt reason and gate values, how many devices of waves 2-4 were ever commanded, and whether the
    dashboard's rollout page (logged in with the admin token through the login form and its CSRF field) shows
    the reason, with its Server-Timing.
(d) retention (after b; ``--skip-retention``): ``edgeship fleet maintenance run`` with ``retention.raw: 1s``, so
    every raw row is old: rows rolled up, job time, the roll-ups' message/request/error counts against the raw
    rows they replaced, and the database and telemetry table sizes before, after, after VACUUM and VACUUM FULL.

    python -m benchmarks.fleet_scale                  # 10,000 devices, 5,000 msg/s for 300 s
    python -m benchmarks.fleet_scale --quick          # 10,000 devices, 30 s of telemetry
    python -m benchmarks.fleet_scale --devices 2000 --skip-telemetry
    python -m benchmarks.fleet_scale --skip-telemetry               # (a) and (c) only

The machine is shared (2 cores here, with PostgreSQL and the broker on it too): numbers are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from benchmarks.machine import describe

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=10"
FLEET = "bench"
SEQ_PHASE_C = 500_000  # above (a)'s sequence numbers: the fleet stores one message per (device, seq)
SEQ_PHASE_B = 1_000_000


class Proc:
    """A child process with its output in a log file; its CPU seconds and RSS read from /proc."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.log = name, log
        self.out = open(log, "ab")  # noqa: SIM115 - kept open for the child's life
        self.popen = subprocess.Popen(
            args, stdout=self.out, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})}
        )

    _cpu = 0.0
    _rss = 0.0

    def cpu_s(self) -> float:
        """CPU seconds used so far (the last value read once the process has ended)."""
        try:
            fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
            self._cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
        return self._cpu

    def rss_mib(self) -> float:
        try:
            for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self._rss = int(line.split()[1]) / 1024
        except OSError:
            pass
        return self._rss

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def stop(self, timeout: float = 60) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.out.close()


def broker_cpu_s(pid: int | None) -> float:
    """mosquitto's CPU seconds so far (0 when it cannot be read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return 0.0


def edgeship(*args: Any, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "edgeship", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    if result.returncode != 0:
        raise SystemExit(f"edgeship {' '.join(map(str, args))} failed: {result.stderr.strip()[-2000:]}")
    return result.stdout


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        import psycopg

        self.args, self.root = args, root
        self.db_name = f"edgeship_bench_{secrets.token_hex(4)}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        self.db = psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={self.db_name}", autocommit=True)
        self.procs: list[Proc] = []
        self.broker: Any = None

    def sql(self, query: str, *params: Any) -> Any:
        return self.db.execute(query, params).fetchall()

    def close(self) -> None:
        import psycopg

        for proc in reversed(self.procs):
            proc.stop()
        if self.broker is not None:
            self.broker.stop()
        self.db.close()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    # ----------------------------------------------------------------- set-up

    def setup(self) -> None:
        from edgeship.fleet.broker import Mosquitto, free_port, write_broker_config
        from edgeship.runtime.package import write_package
        from edgeship.runtime.package.signing import generate_key, public_key_pem
        from tests.package_fixtures import draft_manifest, sample_contents

        args, root = self.args, self.root
        fleet_password = uuid.uuid4().hex
        # Unlimited queues (fleet.broker's default); persistence saved every 100,000 changes rather than on
        # each one: autosave_interval 1 rewrites the broker's database per message (docs/broker.md).
        files = write_broker_config(root / "broker", FLEET, {}, fleet_password, autosave_interval=100_000)
        self.broker = Mosquitto.start(files.directory, files)
        pid_file = root / "mosquitto.pid"
        pid_file.write_text(str(self.broker.pid))
        (root / "fleet-password").write_text(fleet_password)
        key = generate_key()
        pub = root / "publisher.pub"
        pub.write_bytes(public_key_pem(key.public_key()))
        self.packages = {}
        for version in (1, 2, 3):
            path = root / f"bench-net-v{version}.edgepkg"
            write_package(path, draft_manifest(name="bench-net", version=version), sample_contents(), [key])
            self.packages[version] = path
        self.port = free_port()
        config = {
            "fleet_id": FLEET,
            "data_dir": str(root / "fleet-data"),
            "database_url": f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.db_name}",
            "signing_keys": [str(pub)],
            "http": {"host": "127.0.0.1", "port": self.port},
            "broker": {
                "url": f"mqtt://127.0.0.1:{self.broker.port}",
                "password_file": str(root / "fleet-password"),
                "accounts_file": str(files.password_file),
                "pid_file": str(pid_file),
            },
            "scheduler": {"tick_s": 0.5, "lease_s": 15, "resend_after_s": 60},
            "ingest": {"workers": args.ingest_workers},
        }
        import yaml

        self.config = root / "fleet.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.token = edgeship("fleet", "init", "--config", self.config).strip().splitlines()[-1].strip()
        csv_file = root / "devices.csv"
        csv_file.write_text(
            "device_id,target,tags\n"
            + "".join(f"sim-{i:05d},linux-x86_64,site=s{i % 10}\n" for i in range(args.devices))
        )
        self.credentials = root / "credentials.jsonl"
        started = time.monotonic()
        edgeship("fleet", "import-devices", csv_file, "--config", self.config, "--out", self.credentials)
        print(
            f"bulk enrollment: {args.devices} devices in {time.monotonic() - started:.1f} s "
            "(edgeship fleet import-devices, one process start included)"
        )
        # The API and scheduler in one process, ingest in --ingest-processes of their own (0: all in one).
        serve = [sys.executable, "-m", "edgeship", "fleet", "serve", "--config", str(self.config)]
        self.fleet = Proc("fleet", serve + (["--no-ingest"] if args.ingest_processes else []), root / "fleet.log")
        self.procs.append(self.fleet)
        self.ingesters = [
            Proc(
                f"ingest-{i}",
                [sys.executable, "-m", "edgeship", "fleet", "ingest", "-c", str(self.config), "--name", f"bench-{i}"],
                root / f"ingest-{i}.log",
            )
            for i in range(args.ingest_processes)
        ]
        self.procs += self.ingesters
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                self.api("GET", "/api/v1/fleet")
                break
            except OSError:
                if time.monotonic() > deadline or self.fleet.popen.poll() is not None:
                    raise SystemExit(f"fleet serve did not answer; see {self.fleet.log}") from None
                time.sleep(0.3)
        env = {"EDGESHIP_FLEET_URL": self.url, "EDGESHIP_FLEET_TOKEN": self.token}
        edgeship("fleet", "push", self.packages[1], self.packages[2], self.packages[3], env=env)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def simulators(self, name: str, count: int, *extra: str, initial: int = 1) -> list[Proc]:
        """``count`` simulator processes, each with an equal share of the devices (one process tops out near
        2,700 msg/s here: one core of asyncio + paho per-message work)."""
        lines = self.credentials.read_text().splitlines()
        shares = []
        for i in range(count):
            path = self.root / f"credentials-{name}-{i}.jsonl"
            path.write_text("".join(line + "\n" for line in lines[i::count]))
            shares.append(path)
        return [self.simulator(f"{name}-{i}", *extra, initial=initial, credentials=shares[i]) for i in range(count)]

    def simulator(self, name: str, *extra: str, initial: int = 1, credentials: Path | None = None) -> Proc:
        args = [
            sys.executable,
            "-m",
            "edgeship.fleet.simulator",
            "--fleet",
            FLEET,
            "--broker",
            f"127.0.0.1:{self.broker.port}",
            "--credentials",
            str(credentials or self.credentials),
            "--metadata-url",
            f"{self.url}/tuf/metadata/",
            "--initial",
            f"bench-net/linux-x86_64/fp32/v{initial}.edgepkg",
            "--stats-s",
            "5",
            *extra,
        ]
        proc = Proc(name, args, self.root / f"{name}.log")
        self.procs.append(proc)
        deadline = time.monotonic() + 600
        while not any('"started"' in line for line in proc.lines()):
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the simulator did not start; see {proc.log}")
            time.sleep(0.5)
        started = json.loads(next(line for line in proc.lines() if '"started"' in line))
        print(
            f"simulator: {started['devices']} MQTT sessions up in {started['connect_s']:.1f} s, RSS {proc.rss_mib():.0f} MiB"
        )
        return proc

    def telemetry_load(self, interval: float) -> list[Proc]:
        """``fleet.telemetry_load`` (the agent's telemetry over thin MQTT 5 framing) for every device, in one
        process: about 60 us of CPU per message against the simulator's 370 (docs/benchmarks.md)."""
        args = [
            sys.executable,
            "-m",
            "edgeship.fleet.telemetry_load",
            *("--fleet", FLEET, "--broker", f"127.0.0.1:{self.broker.port}"),
            *("--credentials", str(self.credentials), "--telemetry-s", f"{interval:.4f}"),
            *("--duration", str(self.args.duration), "--seq-start", str(SEQ_PHASE_B)),
        ]
        proc = Proc("telemetry-load", args, self.root / "telemetry-load.log")
        self.procs.append(proc)
        deadline = time.monotonic() + 600
        while not any('"started"' in line for line in proc.lines()):
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the telemetry load did not start; see {proc.log}")
            time.sleep(0.5)
        started = json.loads(next(line for line in proc.lines() if '"started"' in line))
        print(f"telemetry load: {started['devices']} MQTT sessions up in {started['connect_s']:.1f} s")
        return [proc]

    def stop_simulator(self, proc: Proc) -> dict[str, Any]:
        proc.stop(timeout=300)
        self.procs.remove(proc)
        stopped = [json.loads(line) for line in proc.lines() if '"stopped"' in line]
        return stopped[-1] if stopped else {}

    # ----------------------------------------------------------------- (a) rollout

    def rollout(self) -> None:
        n = self.args.devices
        sim = self.simulator("sim-rollout", "--telemetry-s", str(self.args.rollout_telemetry_s), "--install-s", "1")
        deadline = time.monotonic() + 600
        while self.sql("SELECT count(*) FROM devices WHERE model_version = 1")[0][0] < n:
            if time.monotonic() > deadline:
                raise SystemExit("not every device reported v1 within 10 minutes")
            time.sleep(1)
        created = self.api(
            "POST",
            "/api/v1/rollouts",
            {"package": "bench-net:2@linux-x86_64", "waves": ["1%", "10%", "50%", "100%"], "soak_s": 0},
        )
        started = time.monotonic()
        wave_start = {0: started}
        wave_done: dict[int, float] = {}
        cpu0 = self.fleet.cpu_s()
        status: dict[str, Any] = {}
        while time.monotonic() - started < self.args.rollout_timeout:
            status = self.api("GET", f"/api/v1/rollouts/{created['id']}")
            now = time.monotonic()
            for wave in status["waves"]:
                i = wave["index"]
                if i not in wave_done and wave["states"].get("COMMITTED", 0) == wave["devices"] and wave["devices"]:
                    wave_done[i] = now
                    wave_start.setdefault(i + 1, now)
            if status["state"] in ("completed", "rolled_back", "aborted"):
                break
            time.sleep(0.25)
        total = time.monotonic() - started
        print(
            f"\n(a) rollout of v2 to {n} devices, waves 1/10/50/100 %, soak 0: {status.get('state')} in {total:.1f} s"
        )
        print(f"    {'wave':>4} {'devices':>8} {'time s':>8}")
        for wave in status.get("waves", []):
            i = wave["index"]
            took = wave_done[i] - wave_start[i] if i in wave_done and i in wave_start else float("nan")
            print(f"    {i + 1:>4} {wave['devices']:>8} {took:>8.1f}   {wave['states']}")
        print(f"    devices committed: {status.get('totals', {}).get('COMMITTED', 0)} of {n}")
        print(
            f"    rate: {n / total * 60:,.0f} devices/minute; AWS IoT Jobs' cap of 1,000/minute would take {n / 1000:.1f} min"
        )
        print(
            f"    fleet process: CPU {self.fleet.cpu_s() - cpu0:.1f} s over the rollout, RSS {self.fleet.rss_mib():.0f} MiB"
        )
        sent = self.stop_simulator(sim)
        print(f"    simulator outcomes: {sent.get('outcomes')}")

    # ----------------------------------------------------------------- (c) bad rollout

    def bad_rollout(self) -> None:
        """v3, ``--bad-p99-ms`` at p99 (the others run at 6 ms), in waves 1/10/50/100 % with ``--bad-soak``: the
        latency gate must halt it during wave 1's soak and the fleet roll wave 1 back (signed downgrade)."""
        args, n = self.args, self.args.devices
        initial = 1 if args.skip_rollout else 2
        sim = self.simulator(
            "sim-bad",
            "--telemetry-s",
            str(args.bad_telemetry_s),
            "--install-s",
            "1",
            "--p99-ms",
            "6",
            "--bad-version",
            "3",
            "--bad-p99-ms",
            str(args.bad_p99_ms),
            "--seq-start",
            str(SEQ_PHASE_C),
            initial=initial,
        )
        deadline = time.monotonic() + 600
        while self.sql("SELECT count(*) FROM devices WHERE model_version = %s", initial)[0][0] < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"not every device reported v{initial} within 10 minutes")
            time.sleep(1)
        time.sleep(args.bad_telemetry_s)  # every device has sent telemetry on v{initial}: the control group's data
        created = self.api(
            "POST",
            "/api/v1/rollouts",
            {"package": "bench-net:3@linux-x86_64", "waves": ["1%", "10%", "50%", "100%"], "soak_s": args.bad_soak},
        )
        started = time.monotonic()
        halted_at = rolled_back_at = None
        status: dict[str, Any] = {}
        while time.monotonic() - started < args.bad_soak + args.rollout_timeout:
            status = self.api("GET", f"/api/v1/rollouts/{created['id']}")
            now = time.monotonic()
            if halted_at is None and status["state"] in ("halted", "rolling_back", "rolled_back"):
                halted_at = now
            if status["state"] == "rolled_back":
                rolled_back_at = now
            if status["ended"]:
                break
            time.sleep(0.25)
        rid = created["id"]
        print(
            f"\n(c) bad rollout of v3 (p99 {args.bad_p99_ms:g} ms against 6 ms) to {n} devices, "
            f"waves 1/10/50/100 %, soak {args.bad_soak:g} s: {status.get('state')}"
        )
        wave0 = status["waves"][0] if status.get("waves") else {"devices": 0, "states": {}}
        settled = (
            status["wave_done_at"] - status["created_at"] if status.get("wave_done_at") is not None else float("nan")
        )

        def secs(t: float | None) -> str:
            return f"{t - started:.1f} s" if t is not None else "never (timed out)"

        print(f"    wave 1: {wave0['devices']} devices, all settled {settled:.1f} s after creation; {wave0['states']}")
        print(
            f"    creation -> halted: {secs(halted_at)}; creation -> rolled_back (wave 1 reverted): {secs(rolled_back_at)}"
        )
        if halted_at is not None and rolled_back_at is not None:
            print(
                f"    halted and rolled back within one soak period ({args.bad_soak:g} s) of creation? "
                f"{'yes' if rolled_back_at - started <= args.bad_soak else 'no'}; halted "
                f"{halted_at - started - settled:.1f} s into wave 1's soak (early halt: rollout_logic.judge_early, "
                f"once half of the wave has reported telemetry on v3)"
            )
        print(f"    halt reason: {status.get('halt_reason')}")
        print(f"    gate values: {json.dumps(status.get('gate_values'))}")
        later = self.sql(
            "SELECT count(*) FILTER (WHERE deployment_id IS NOT NULL OR commanded_at IS NOT NULL), count(*), "
            "count(*) FILTER (WHERE state = 'skipped') FROM rollout_devices WHERE rollout_id = %s AND wave > 0",
            rid,
        )[0]
        print(
            f"    waves 2-4: {later[0]} of {later[1]} devices ever commanded ({later[2]} skipped); "
            f"deploy commands in all: {self.sql('SELECT count(*) FROM rollout_devices WHERE rollout_id = %s AND deployment_id IS NOT NULL', rid)[0][0]}, "
            f"reverts: {self.sql('SELECT count(*) FROM rollout_devices WHERE rollout_id = %s AND revert_deployment_id IS NOT NULL', rid)[0][0]}"
        )
        # The devices table learns a device's version from its telemetry and status, so it lags the revert events.
        waited = time.monotonic()
        while (on_v3 := self.sql("SELECT count(*) FROM devices WHERE model_version = 3")[0][0]) and (
            time.monotonic() - waited < 2 * args.bad_telemetry_s + 10
        ):
            time.sleep(0.5)
        print(
            f"    devices reporting v3 in their telemetry: {on_v3} "
            f"({time.monotonic() - waited:.1f} s after rolled_back; a device reports its version every "
            f"{args.bad_telemetry_s:g} s)"
        )
        self.dashboard_check(rid, status.get("halt_reason") or "")
        sent = self.stop_simulator(sim)
        print(f"    simulator outcomes: {sent.get('outcomes')}")

    def dashboard_check(self, rollout_id: int, reason: str) -> None:
        """Log in to the dashboard with the admin token like a browser (pre-login cookie, CSRF field in the form,
        session cookie) and fetch the rollout's page."""
        import html
        import http.cookiejar
        import re
        import urllib.parse

        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        with opener.open(f"{self.url}/dashboard/login", timeout=60) as response:
            form = response.read().decode()
        csrf = re.search(r'name="csrf" value="([^"]*)"', form)
        if csrf is None:
            print("    dashboard: no CSRF field in the login form")
            return
        path = f"/dashboard/rollouts/{rollout_id}"
        body = urllib.parse.urlencode({"csrf": html.unescape(csrf.group(1)), "token": self.token, "next": path})
        login = urllib.request.Request(
            f"{self.url}/dashboard/login",
            data=body.encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            method="POST",
        )
        with opener.open(login, timeout=60) as response:  # follows the 303 to the rollout's page
            landed = response.geturl()
        with opener.open(f"{self.url}{path}", timeout=60) as response:
            page = html.unescape(response.read().decode())
            timing = response.headers.get("Server-Timing")
        shown = bool(reason) and reason in page
        print(
            f"    dashboard ({path}, logged in, landed on {urllib.parse.urlsplit(landed).path}): "
            f"shows the reason: {'yes' if shown else 'no'}; Server-Timing: {timing}"
        )

    # ----------------------------------------------------------------- (b) telemetry

    def telemetry(self) -> None:
        args = self.args
        n = args.devices
        interval = n / args.rate
        size0 = self.sql("SELECT pg_database_size(current_database())")[0][0]
        stored0 = self.sql("SELECT count(*) FROM telemetry")[0][0]
        if args.telemetry_load == "thin":
            sims = self.telemetry_load(interval)
        else:
            sims = self.simulators(
                "sim-telemetry",
                args.sim_processes,
                "--telemetry-s",
                f"{interval:.4f}",
                "--seq-start",
                str(SEQ_PHASE_B),
                "--duration",
                str(args.duration),
                "--no-strict",
                initial=1 if self.args.skip_rollout else 2,
            )
        t0 = time.monotonic()
        fleet_procs = [self.fleet, *self.ingesters]
        cpu0, sim_cpu0 = sum(p.cpu_s() for p in fleet_procs), sum(p.cpu_s() for p in sims)
        broker_cpu0 = broker_cpu_s(self.broker.pid)
        samples: list[tuple[float, int, float]] = []
        rss_peak = 0.0
        print(
            f"\n(b) telemetry: {n} devices every {interval:.2f} s = {args.rate:,} msg/s QoS 1 for {args.duration:g} s"
        )
        while all(p.popen.poll() is None for p in sims):
            time.sleep(5)
            if any(p.popen.poll() is not None for p in sims):
                break  # a sample after the devices stopped would count the idle time as lag
            stored = self.sql("SELECT count(*) FROM telemetry WHERE seq >= %s", SEQ_PHASE_B)[0][0]
            last = self.sql("SELECT ts FROM telemetry ORDER BY id DESC LIMIT 1")
            lag = time.time() - last[0][0] if last else float("nan")
            rss = sum(p.rss_mib() for p in fleet_procs)
            rss_peak = max(rss_peak, rss)
            for p in [*sims, *fleet_procs]:
                p.cpu_s()
            samples.append((time.monotonic() - t0, stored, lag))
            print(
                f"    t={samples[-1][0]:5.0f} s  stored {stored:>9,}  ingest lag {lag:6.1f} s  fleet RSS {rss:.0f} MiB"
            )
        elapsed = time.monotonic() - t0
        fleet_cpu, sim_cpu = sum(p.cpu_s() for p in fleet_procs) - cpu0, sum(p.cpu_s() for p in sims) - sim_cpu0
        broker_cpu = broker_cpu_s(self.broker.pid) - broker_cpu0
        ends = [self.stop_simulator(p) for p in sims]
        # The simulator counts what it published; the thin load what the broker acknowledged (and says what not).
        sent = sum(int(e.get("telemetry", e.get("sent", 0))) for e in ends)
        for end in ends:
            if end.get("refused") or end.get("unacknowledged") or end.get("dropped") or end.get("connect_failed"):
                print(f"    load generator trouble: {end}")
        drain0 = time.monotonic()
        while True:
            stored = self.sql("SELECT count(*) FROM telemetry WHERE seq >= %s", SEQ_PHASE_B)[0][0]
            if stored >= sent or time.monotonic() - drain0 > 300:
                break
            time.sleep(1)
        drain = time.monotonic() - drain0
        gaps = self.sql(
            "SELECT coalesce(sum(hi - lo + 1 - n), 0), count(*) FROM (SELECT device_id, min(seq) lo, max(seq) hi, "
            "count(*) n FROM telemetry WHERE seq >= %s GROUP BY device_id) g",
            SEQ_PHASE_B,
        )[0]
        size1 = self.sql("SELECT pg_database_size(current_database())")[0][0]
        window = [s for s in samples if s[0] >= 10]
        sustained = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0]) if len(window) > 1 else float("nan")
        print(
            f"    sent {sent:,} ({sent / args.duration:,.0f} msg/s offered over {args.duration:g} s); stored {stored:,}; "
            f"lost {sent - stored:,}; sequence gaps {gaps[0]} over {gaps[1]} devices"
        )
        print(
            f"    ingest: {sustained:,.0f} msg/s stored (steady state, from t=10 s); max lag {max((s[2] for s in samples), default=float('nan')):.1f} s; "
            f"{drain:.1f} s to drain after the devices stopped"
        )
        print(
            f"    fleet ({len(fleet_procs)} processes: serve{' --no-ingest' if self.ingesters else ''} + "
            f"{len(self.ingesters)} 'fleet ingest'): CPU {fleet_cpu / elapsed * 100:.0f} % of one core, "
            f"RSS peak {rss_peak:.0f} MiB; devices ({len(sims)} {args.telemetry_load} load processes) CPU "
            f"{sim_cpu / elapsed * 100:.0f} %; mosquitto CPU {broker_cpu / elapsed * 100:.0f} %"
        )
        print(
            f"    database: {size0 / 2**20:.0f} MiB before, {size1 / 2**20:.0f} MiB after "
            f"({(size1 - size0) / max(1, stored - 0):.0f} B per stored message); {stored0:,} rows before phase b"
        )

    # ----------------------------------------------------------------- (d) retention roll-up

    def sizes(self) -> str:
        db, tel, heap, rollups = self.sql(
            "SELECT pg_database_size(current_database()), pg_total_relation_size('telemetry'), "
            "pg_relation_size('telemetry'), pg_total_relation_size('telemetry_minute') + "
            "pg_total_relation_size('telemetry_hour')"
        )[0]
        return (
            f"database {db / 2**20:.0f} MiB, telemetry table {tel / 2**20:.0f} MiB (heap {heap / 2**20:.0f} MiB, "
            f"the rest indexes), roll-up tables {rollups / 2**20:.1f} MiB"
        )

    def retention(self) -> None:
        """The maintenance job with ``retention.raw: 1s``: every raw row (phases a-c) is old; roll-ups checked."""
        import yaml

        config = yaml.safe_load(self.config.read_text())
        config["retention"] = {"raw": "1s", "batch": 5000}
        short = self.root / "fleet-retention.yaml"
        short.write_text(yaml.safe_dump(config))
        totals = "SELECT count(*), coalesce(sum(requests), 0), coalesce(sum(errors), 0) FROM telemetry"
        rolled = "SELECT coalesce(sum(n), 0), coalesce(sum(requests), 0), coalesce(sum(errors), 0) FROM {}"
        raw0 = self.sql(totals)[0]
        minute0, hour0 = self.sql(rolled.format("telemetry_minute"))[0], self.sql(rolled.format("telemetry_hour"))[0]
        print(f"\n(d) retention roll-up of {raw0[0]:,} raw telemetry rows (retention.raw 1s; the fleet's own is 7d)")
        print(f"    before:              {self.sizes()}")
        time.sleep(1.5)
        began = time.monotonic()
        report = json.loads(edgeship("fleet", "maintenance", "run", "--config", short, "--json"))
        took = time.monotonic() - began
        raw1 = self.sql(totals)[0]
        minute1, hour1 = self.sql(rolled.format("telemetry_minute"))[0], self.sql(rolled.format("telemetry_hour"))[0]
        rows = self.sql("SELECT (SELECT count(*) FROM telemetry_minute), (SELECT count(*) FROM telemetry_hour)")[0]
        print(
            f"    job: {json.dumps(report)} in {took:.1f} s (edgeship fleet maintenance run, one process start "
            f"included); {rows[0]:,} minute and {rows[1]:,} hour roll-up rows; {raw1[0]:,} raw rows left"
        )
        replaced = [a - b for a, b in zip(raw0, raw1, strict=True)]
        for name, before, after in (("minute", minute0, minute1), ("hour", hour0, hour1)):
            added = [a - b for a, b in zip(after, before, strict=True)]
            same = "equal" if added == replaced else "DIFFER"
            print(
                f"    {name} roll-ups added messages/requests/errors {added[0]:,}/{added[1]:,}/{added[2]:,}; "
                f"raw rows replaced {replaced[0]:,}/{replaced[1]:,}/{replaced[2]:,}: {same}"
            )
        print(f"    after the job:       {self.sizes()}")
        began = time.monotonic()
        self.db.execute("VACUUM telemetry")
        print(f"    after VACUUM ({time.monotonic() - began:.1f} s): {self.sizes()}")
        began = time.monotonic()
        self.db.execute("VACUUM FULL telemetry")
        print(f"    after VACUUM FULL telemetry ({time.monotonic() - began:.1f} s): {self.sizes()}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--rate", type=int, default=5_000, help="telemetry messages per second in (b)")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of telemetry in (b)")
    p.add_argument("--quick", action="store_true", help="30 s of telemetry")
    p.add_argument("--skip-rollout", action="store_true")
    p.add_argument("--skip-telemetry", action="store_true")
    p.add_argument("--ingest-workers", type=int, default=1, help="ingest MQTT clients in the fleet process")
    p.add_argument(
        "--ingest-processes",
        type=int,
        default=2,
        help="'edgeship fleet ingest' processes beside 'fleet serve --no-ingest' (0: serve ingests itself)",
    )
    p.add_argument(
        "--telemetry-load",
        choices=("thin", "simulator"),
        default="thin",
        help="(b)'s devices: fleet.telemetry_load (thin MQTT framing) or the full simulator",
    )
    p.add_argument("--sim-processes", type=int, default=2, help="with --telemetry-load simulator: its processes")
    p.add_argument("--rollout-telemetry-s", type=float, default=30.0, help="telemetry interval during (a)")
    p.add_argument("--rollout-timeout", type=float, default=900.0)
    p.add_argument("--skip-bad-rollout", action="store_true", help="skip (c), the rollout the latency gate halts")
    p.add_argument("--bad-soak", type=float, default=60.0, help="soak period of the bad rollout in (c), seconds")
    p.add_argument("--bad-p99-ms", type=float, default=30.0, help="p99 latency of the bad v3 in (c) (the others: 6)")
    p.add_argument("--bad-telemetry-s", type=float, default=10.0, help="telemetry interval during (c)")
    p.add_argument("--skip-retention", action="store_true", help="skip (d), the retention roll-up after (b)")
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = 30.0
    print(f"machine: {describe()}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (a shared machine: numbers are noisy)")
    # SIGTERM (a background run stopped by hand) cleans up like Ctrl-C: children stopped, database dropped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    root = Path(tempfile.mkdtemp(prefix="edgeship-fleet-scale-"))
    bench = Bench(args, root)
    try:
        bench.setup()
        if not args.skip_rollout:
            bench.rollout()
        if not args.skip_bad_rollout:
            bench.bad_rollout()
        if not args.skip_telemetry:
            bench.telemetry()
            if not args.skip_retention:
                bench.retention()
    finally:
        bench.close()
        if args.keep:
            print(f"logs in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    threading.current_thread().name = "fleet-scale"
    main()
