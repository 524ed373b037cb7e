"""Fleet at scale on this machine: a rollout to N simulated devices, and sustained QoS 1 telemetry into PostgreSQL.

Every part is real and runs as its own process: mosquitto (its own, on a free port, configured by
``fleet.broker`` with unlimited queues), ``edgeship fleet serve`` on a fresh PostgreSQL database at
127.0.0.1:5432 (dropped at the end), and ``python -m edgeship.fleet.simulator`` holding every device's
MQTT session in one asyncio process. Devices are enrolled in bulk (``edgeship fleet import-devices``).

(a) rollout: every device starts on v1; v2 is rolled out in waves 1%, 10%, 50%, 100% with soak 0 until
    every device reports COMMITTED. Prints the time per wave and in all, against AWS IoT Jobs' cap of
    1,000 devices a minute.
(b) telemetry: the devices send QoS 1 telemetry at ``--rate`` messages/s for ``--duration`` seconds; the
    database is then checked by sequence number (messages lost, gaps); ingest lag, the fleet process's
    RSS and CPU and the database size are printed.

    python -m benchmarks.fleet_scale                  # 10,000 devices, 5,000 msg/s for 300 s
    python -m benchmarks.fleet_scale --quick          # 10,000 devices, 30 s of telemetry
    python -m benchmarks.fleet_scale --devices 2000 --skip-telemetry

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
        for version in (1, 2):
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
        self.fleet = Proc(
            "fleet",
            [sys.executable, "-m", "edgeship", "fleet", "serve", "--config", str(self.config)],
            root / "fleet.log",
        )
        self.procs.append(self.fleet)
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
        edgeship("fleet", "push", self.packages[1], self.packages[2], env=env)

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

    # ----------------------------------------------------------------- (b) telemetry

    def telemetry(self) -> None:
        args = self.args
        n = args.devices
        interval = n / args.rate
        size0 = self.sql("SELECT pg_database_size(current_database())")[0][0]
        stored0 = self.sql("SELECT count(*) FROM telemetry")[0][0]
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
        cpu0, sim_cpu0 = self.fleet.cpu_s(), sum(p.cpu_s() for p in sims)
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
            rss_peak = max(rss_peak, self.fleet.rss_mib())
            for p in sims:
                p.cpu_s()
            samples.append((time.monotonic() - t0, stored, lag))
            print(
                f"    t={samples[-1][0]:5.0f} s  stored {stored:>9,}  ingest lag {lag:6.1f} s  fleet RSS {self.fleet.rss_mib():.0f} MiB"
            )
        elapsed = time.monotonic() - t0
        fleet_cpu, sim_cpu = self.fleet.cpu_s() - cpu0, sum(p.cpu_s() for p in sims) - sim_cpu0
        sent = sum(int(self.stop_simulator(p).get("telemetry", 0)) for p in sims)
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
            f"    fleet process: CPU {fleet_cpu / elapsed * 100:.0f} % of one core, RSS peak {rss_peak:.0f} MiB; "
            f"simulators ({len(sims)} processes) CPU {sim_cpu / elapsed * 100:.0f} %"
        )
        print(
            f"    database: {size0 / 2**20:.0f} MiB before, {size1 / 2**20:.0f} MiB after "
            f"({(size1 - size0) / max(1, stored - 0):.0f} B per stored message); {stored0:,} rows before phase b"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--rate", type=int, default=5_000, help="telemetry messages per second in (b)")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of telemetry in (b)")
    p.add_argument("--quick", action="store_true", help="30 s of telemetry")
    p.add_argument("--skip-rollout", action="store_true")
    p.add_argument("--skip-telemetry", action="store_true")
    p.add_argument("--ingest-workers", type=int, default=1, help="ingest MQTT clients in the fleet process")
    p.add_argument("--sim-processes", type=int, default=2, help="simulator processes sharing the devices in (b)")
    p.add_argument("--rollout-telemetry-s", type=float, default=30.0, help="telemetry interval during (a)")
    p.add_argument("--rollout-timeout", type=float, default=900.0)
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
        if not args.skip_telemetry:
            bench.telemetry()
    finally:
        bench.close()
        if args.keep:
            print(f"logs in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    threading.current_thread().name = "fleet-scale"
    main()
