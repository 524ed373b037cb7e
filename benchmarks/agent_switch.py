"""Latency of the agent's local endpoint while the fleet updates the model under it, against the same agent idle.

Everything real, from tests/device_agent/crash_harness.py's ``Rig``: a mosquitto broker, a TUF
repository behind an HTTP server, signed packages, ``python -m edgeship agent run`` (v1
committed). A load generator in its own process (benchmarks/load_generator.py, so its GIL and
CPU are not the agent's) sends ``POST /v1/infer`` (JSON, the test classifier) at a fixed rate
over keep-alive connections for the whole run. Each cycle:

1. an idle window (no deployment): the reference;
2. the fleet deploys a good package with ``--padding-mib`` MiB of padding (DOWNLOADING unthrottled
   unless ``--bandwidth-kib-s``; VERIFYING: TUF hashes, signature, unpack into the other slot;
   VALIDATING: golden vectors in a child process at nice 10; ACTIVATING; HEALTH_CHECK for
   ``--health-window-s``; COMMITTED);
3. another idle window;
4. the fleet deploys a slow package (same I/O, 24 wide layers) that the health window's
   latency gate rolls back (HEALTH_CHECK -> ROLLING_BACK -> ROLLED_BACK).

After the cycles, a control: an idle window, then one with an unrelated busy loop at nice 19 in
its own process. It shows what any background work on the second core costs the endpoint here,
the yardstick for the validation child (nice 10) and the OTA thread.

Every request is placed in a phase by its send time (wall clock) against the ``ota.transition``
events the agent published (their ``ts`` is taken just after the journal write). Requests
answered by the slow model are its own latency, not the update's: they are shown apart and left
out of the goal. Printed: failed requests (goal 0), p50/p99/max per phase, p99(update)/p99(idle)
(goal <= 1.5), and the CPU used per phase by the agent, its children (the validation child), the
load generator and this process (file server and MQTT client), sampled every 100 ms from /proc.

Reproduce::

    cd /work/main && .venv/bin/python -m benchmarks.agent_switch [--cycles 5] [--rate 100] [--json OUT]

About 3-4 minutes with the defaults. Exit status 1 when a goal fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import cpu, describe, single_thread_env

FAILED_GOAL = 0
P99_RATIO_GOAL = 1.5
CLK_TCK = os.sysconf("SC_CLK_TCK")
PHASE_OF_STATE = {
    "DOWNLOADING": "DOWNLOADING",
    "VERIFYING": "VERIFYING",
    "STAGED": "VALIDATING",
    "VALIDATING": "VALIDATING",
    "ACTIVATING": "ACTIVATING",
    "HEALTH_CHECK": "HEALTH_CHECK",
    "ROLLING_BACK": "ROLLING_BACK",
}
PHASES = ("DOWNLOADING", "VERIFYING", "VALIDATING", "ACTIVATING", "HEALTH_CHECK", "ROLLING_BACK")
PHASE_NOTES = {
    "VERIFYING": "VERIFYING (TUF hash, unpack + hashes)",
    "VALIDATING": "STAGED..VALIDATING (child)",
}


# A busy loop at nice 19 that has nothing to do with the agent: the control window shows what any
# background work on the other core costs the endpoint's latency on this machine.
BURNER = "import os\nos.nice(19)\nwhile True:\n    pass\n"

# ---------------------------------------------------------------- CPU sampling


def _stat(pid: int | str) -> tuple[float, float] | None:
    """(utime + stime, cutime + cstime) of a process in seconds; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = text[text.rindex(")") + 2 :].split()
    return (int(f[11]) + int(f[12])) / CLK_TCK, (int(f[13]) + int(f[14])) / CLK_TCK


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    except OSError:
        pass
    return out


def _machine_busy() -> float:
    """Busy seconds of all CPUs together (user + nice + system + irq + softirq + steal) from /proc/stat."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class CpuSampler:
    """Every ``period`` s: cumulative CPU seconds of the agent, its children, the load generator, this process."""

    def __init__(self, agent_pid: int, load_pid: int, period: float = 0.1) -> None:
        self.agent_pid, self.load_pid, self.period = agent_pid, load_pid, period
        self.rows: list[tuple[float, float, float, float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[float, float, float, float, float, float]:
        last = self.rows[-1] if self.rows else (0.0,) * 6
        agent = _stat(self.agent_pid)
        # A child that exits between listing and reading is counted once the agent reaps it (cutime).
        children = agent[1] + sum((_stat(c) or (0.0, 0.0))[0] for c in _children(self.agent_pid)) if agent else 0.0
        load = _stat(self.load_pid)
        me = _stat(os.getpid())
        # Counters only grow; a process that could not be read keeps its last value.
        return (
            time.time(),
            max(agent[0] if agent else 0.0, last[1]),
            max(children, last[2]),
            max(load[0] if load else 0.0, last[3]),
            max(me[0] if me else 0.0, last[4]),
            _machine_busy(),
        )

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.rows.append(self.sample())

    def start(self) -> CpuSampler:
        self.rows.append(self.sample())
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def usage(self, t0: float, t1: float) -> dict[str, float] | None:
        """Mean CPU use between wall times t0 and t1, in % of one core, per process group."""
        rows = np.array(self.rows)
        if len(rows) < 2:
            return None
        i0 = int(np.searchsorted(rows[:, 0], t0))
        i1 = int(np.searchsorted(rows[:, 0], t1))
        i0, i1 = max(i0 - 1, 0), min(i1, len(rows) - 1)
        if i1 <= i0:
            return None
        span = rows[i1, 0] - rows[i0, 0]
        d = (rows[i1] - rows[i0]) * 100 / span
        return {"agent": d[1], "children": d[2], "loadgen": d[3], "bench": d[4], "machine": d[5], "span_s": span}


# ---------------------------------------------------------------- phases


@dataclass
class Window:
    label: str  # "idle", or "<kind> v<version>: <phase>"
    phase: str  # "idle" or one of PHASES
    kind: str  # "idle", "good", "slow"
    t0: float
    t1: float


@dataclass
class PhaseStats:
    n: int
    failed: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)


def _stats(lat: list[float], failed: int) -> PhaseStats:
    if not lat:
        return PhaseStats(0, failed, None, None, None)
    a = np.array(lat) * 1e3
    return PhaseStats(len(a), failed, float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.max()))


def deployment_windows(events: list[dict[str, Any]], kind: str) -> list[Window]:
    """Phase windows of one deployment from its ota.transition events (ts of each state's journal write)."""
    transitions = sorted(
        ((float(e["ts"]), str(e["state"])) for e in events if e["event"] == "ota.transition"), key=lambda x: x[0]
    )
    windows: list[Window] = []
    for (ts, state), (next_ts, _) in itertools.pairwise(transitions):
        phase = PHASE_OF_STATE.get(state)
        if phase is None:
            continue
        if windows and windows[-1].phase == phase:
            windows[-1].t1 = next_ts
        else:
            windows.append(Window(f"{kind}: {phase}", phase, kind, ts, next_ts))
    return windows


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from benchmarks.load_generator import LoadGenerator
    from edgeship.runtime.package import load_private_key, write_keypair
    from tests.agent_models import PackageSpec, build_package, sample_inputs
    from tests.device_agent.crash_harness import AgentProcess, Rig

    logging.getLogger("edgeship").setLevel(logging.ERROR)
    key, pub = write_keypair(work / "keys", "publisher")
    rig = Rig(work / "rig", key, pub, padding_mib=1)  # its own v2 packages stay unused here
    try:
        t0 = time.monotonic()
        targets: list[tuple[str, int, str]] = []  # (kind, version, target path)
        for c in range(args.cycles):
            good, slow = 2 + 2 * c, 3 + 2 * c
            for kind, version, spec in (
                ("good", good, PackageSpec(version=good, padding_mib=args.padding_mib)),
                ("slow", slow, PackageSpec(version=slow, kind="slow", slow_layers=24)),
            ):
                path = build_package(work / f"v{version}-{kind}.edgepkg", load_private_key(key), spec)
                targets.append((kind, version, rig.fleet.publish(path, path=f"switch/v{version}-{kind}.edgepkg")))
        print(f"  built and published {len(targets)} packages in {time.monotonic() - t0:.1f} s", flush=True)

        name, config, url, data = rig.device("switch", bandwidth_kib_s=args.bandwidth_kib_s)
        env: dict[str, str] = {}
        if args.agent_site is not None:  # diagnostics: e.g. a sitecustomize.py that changes the agent
            env = {"PYTHONPATH": f"{args.agent_site.resolve()}{os.pathsep}{Path(__file__).resolve().parent.parent}"}
        started = time.time()
        agent = AgentProcess(config, url, data.parent / f"{name}.log", env=env, python=args.agent_python).start()
        body = json.dumps({"inputs": sample_inputs(1, seed=4).tolist()}).encode()
        load: LoadGenerator | None = None
        sampler: CpuSampler | None = None
        windows: list[Window] = []
        deployments: list[dict[str, Any]] = []
        try:
            agent.wait_ready()
            rig.fleet.wait_online(name, since=started)
            assert agent.process is not None
            load = LoadGenerator(url + "/v1/infer", body, args.rate, connections=args.connections).start()
            sampler = CpuSampler(agent.process.pid, load.pid).start()
            time.sleep(args.warmup_s)
            for kind, version, target in targets:
                a = time.time()
                time.sleep(args.idle_s)
                windows.append(Window("idle", "idle", "idle", a, time.time()))
                health: dict[str, Any] = {"window_s": args.health_window_s}
                dep = rig.fleet.deploy(target, device=name, health=health, validation={"runs": args.validation_runs})
                end = rig.fleet.wait_end(dep, device=name, timeout=600)
                time.sleep(0.5)  # the terminal event's successor: let the last answers land
                events = rig.fleet.events(name, dep)
                dep_windows = deployment_windows(events, f"{kind} v{version}")
                for w in dep_windows:
                    w.kind = kind
                windows += dep_windows
                expected = "COMMITTED" if kind == "good" else "ROLLED_BACK"
                deployments.append(
                    {
                        "kind": kind,
                        "version": version,
                        "deployment_id": dep,
                        "end": end["state"],
                        "code": end.get("code"),
                        "message": end.get("message"),
                        "expected": expected,
                        "states": [(e["ts"], e["state"]) for e in events if e["event"] == "ota.transition"],
                    }
                )
                spans = ", ".join(f"{w.phase} {w.t1 - w.t0:.2f} s" for w in dep_windows)
                print(f"  {kind} v{version}: {end['state']} ({end.get('code') or 'ok'}); {spans}", flush=True)
                if end.get("message"):
                    print(f"    {end['message']}", flush=True)
                time.sleep(args.settle_s)
            if args.control_s > 0:
                a = time.time()
                time.sleep(args.control_s)
                windows.append(Window("idle", "idle", "idle", a, time.time()))
                burner = subprocess.Popen([sys.executable, "-c", BURNER])
                try:
                    time.sleep(0.5)
                    a = time.time()
                    time.sleep(args.control_s)
                    windows.append(Window("control", "control", "control", a, time.time()))
                finally:
                    burner.kill()
                    burner.wait()
        finally:
            requests = load.stop() if load is not None else None
            if sampler is not None:
                sampler.stop()
            agent.stop()
    finally:
        rig.close()
    assert requests is not None and sampler is not None
    return {"windows": windows, "requests": requests, "sampler": sampler, "deployments": deployments}


def analyse(result: dict[str, Any], args: argparse.Namespace) -> tuple[bool, dict[str, Any]]:
    windows: list[Window] = result["windows"]
    req = result["requests"]
    sampler: CpuSampler = result["sampler"]
    deployments = result["deployments"]
    slow_versions = {d["version"] for d in deployments if d["kind"] == "slow"}
    sent = np.array(req.sent_at)
    lat = np.array(req.latency_s)
    ok = np.array([s == 200 for s in req.status])
    by_slow = np.array([_served_by(m) in slow_versions for m in req.model])
    starts = np.array([w.t0 for w in windows])
    order = np.argsort(starts)
    windows = [windows[i] for i in order]
    starts = starts[order]
    ends = np.array([w.t1 for w in windows])
    idx = np.searchsorted(starts, sent, side="right") - 1
    inside = (idx >= 0) & (sent < ends[np.clip(idx, 0, None)])

    groups: dict[tuple[str, str], dict[str, list[Any]]] = {}
    for i in range(len(sent)):
        if not inside[i]:
            group = ("between", "")  # warm-up, the settle after a deployment ended
        else:
            w = windows[idx[i]]
            if w.phase == "idle":
                group = ("idle", "")
            elif w.phase == "control":
                group = ("control", "")
            elif by_slow[i]:
                group = ("slow model answering (by design)", w.phase)
            else:
                group = (w.kind, w.phase)
        g = groups.setdefault(group, {"lat": [], "failed": []})
        if ok[i]:
            g["lat"].append(lat[i])
        else:
            g["failed"].append(f"{req.status[i]} {req.model[i]}")
    seconds: dict[tuple[str, str], float] = {}
    cpu_use: dict[tuple[str, str], list[tuple[float, dict[str, float]]]] = {}
    for w in windows:
        key = ("idle", "") if w.phase == "idle" else ("control", "") if w.phase == "control" else (w.kind, w.phase)
        seconds[key] = seconds.get(key, 0.0) + (w.t1 - w.t0)
        use = sampler.usage(w.t0, w.t1)
        if use is not None:
            cpu_use.setdefault(key, []).append((w.t1 - w.t0, use))

    def stats_of(key: tuple[str, str]) -> PhaseStats:
        g = groups.get(key, {"lat": [], "failed": []})
        s = _stats(g["lat"], len(g["failed"]))
        s.seconds = seconds.get(key, 0.0)
        spans = cpu_use.get(key, [])
        total = sum(d for d, _ in spans)
        if total > 0:
            s.cpu = {
                k: sum(d * u[k] for d, u in spans) / total for k in ("agent", "children", "loadgen", "bench", "machine")
            }
        return s

    idle = stats_of(("idle", ""))
    update_lat = [x for (kind, phase), g in groups.items() if kind in ("good", "slow") for x in g["lat"]]
    update_failed = sum(len(g["failed"]) for (kind, _), g in groups.items() if kind in ("good", "slow"))
    update = _stats(update_lat, update_failed)
    update.seconds = sum(v for (kind, _), v in seconds.items() if kind in ("good", "slow"))
    failed_total = int((~ok).sum())
    rows: list[tuple[str, PhaseStats]] = [("idle (no deployment)", idle)]
    control = stats_of(("control", ""))
    if control.n:
        rows.append(("control: idle + a nice-19 busy loop", control))
    for kind in ("good", "slow"):
        for phase in PHASES:
            if (kind, phase) in groups or (kind, phase) in seconds:
                rows.append((f"{kind}: {PHASE_NOTES.get(phase, phase)}", stats_of((kind, phase))))
    for phase in PHASES:
        key = ("slow model answering (by design)", phase)
        if key in groups:
            rows.append((f"slow model answering, in {phase}", stats_of(key)))
    rows.append(("all update phases (goal rows)", update))
    between = stats_of(("between", ""))

    print()
    print(
        f"  {len(req)} requests at {args.rate:g}/s over {args.connections} connections; "
        f"{failed_total} failed (goal {FAILED_GOAL})"
    )
    if failed_total:
        failures = [f"{s} {m}" for s, m in zip(req.status, req.model) if s != 200]
        print(f"    first failures: {failures[:5]}")
    print()
    head = f"  {'phase':<44}{'s':>7}{'n':>7}{'fail':>6}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'p99/idle':>10}"
    head += f"{'  CPU %: agent':>15}{'child':>7}{'loadgen':>9}{'bench':>7}{'machine':>9}"
    print(head)
    for label, s in rows:
        ratio = (s.p99_ms / idle.p99_ms) if (s.p99_ms is not None and idle.p99_ms) else None
        cpu_text = ""
        if s.cpu:
            cpu_text = (
                f"{s.cpu['agent']:>15.0f}{s.cpu['children']:>7.0f}{s.cpu['loadgen']:>9.0f}"
                f"{s.cpu['bench']:>7.0f}{s.cpu['machine']:>9.0f}"
            )
        print(
            f"  {label:<44}{(f'{s.seconds:.1f}' if s.seconds else '-'):>7}{s.n:>7}{s.failed:>6}{_fmt(s.p50_ms):>9}{_fmt(s.p99_ms):>9}"
            f"{_fmt(s.max_ms):>9}{(f'{ratio:.2f}x' if ratio is not None else '-'):>10}{cpu_text}"
        )
    print(f"  (outside any window: warm-up and settle after each deployment, {between.n} requests)")
    print("  CPU %: of one core (this machine has 2, so 200 is all of it); child = the agent's child processes")
    ratio = update.p99_ms / idle.p99_ms if (update.p99_ms and idle.p99_ms) else float("inf")
    ends_ok = all(d["end"] == d["expected"] for d in deployments)
    print()
    print(
        f"  GOAL failed requests = {FAILED_GOAL}: {failed_total} -> {'PASS' if failed_total == FAILED_GOAL else 'FAIL'}; "
        f"p99 during the update / idle <= {P99_RATIO_GOAL:g}: {update.p99_ms or float('nan'):.2f} / "
        f"{idle.p99_ms or float('nan'):.2f} ms = {ratio:.2f}x -> {'PASS' if ratio <= P99_RATIO_GOAL else 'FAIL'}"
    )
    print(
        f"  deployments ended as expected: {sum(d['end'] == d['expected'] for d in deployments)} of {len(deployments)}"
    )
    passed = failed_total == FAILED_GOAL and ratio <= P99_RATIO_GOAL and ends_ok
    summary = {
        "requests": len(req),
        "failed": failed_total,
        "idle": idle.__dict__,
        "control": control.__dict__,
        "update": update.__dict__,
        "p99_ratio": ratio,
        "rows": [{"label": label, **s.__dict__} for label, s in rows],
        "deployments": deployments,
        "passed": passed,
    }
    return passed, summary


def _served_by(model_header: str) -> int | None:
    parts = model_header.split("/")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=5, help="good + slow deployments (default 5)")
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s (default 100)")
    parser.add_argument("--connections", type=int, default=4, help="keep-alive connections (default 4)")
    parser.add_argument("--padding-mib", type=int, default=96, help="padding of the good packages, MiB (default 96)")
    parser.add_argument("--bandwidth-kib-s", type=float, default=None, help="cap the download (default: none)")
    parser.add_argument("--health-window-s", type=float, default=5.0, help="health window (default 5 s)")
    parser.add_argument("--validation-runs", type=int, default=50, help="timed runs in the validation child")
    parser.add_argument("--idle-s", type=float, default=10.0, help="idle window before each deployment (default 10 s)")
    parser.add_argument(
        "--control-s",
        type=float,
        default=20.0,
        help="after the cycles: an idle window, then one with a nice-19 busy-loop process (0: skip)",
    )
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--settle-s", type=float, default=1.0)
    parser.add_argument("--agent-python", default=sys.executable, help="the agent's interpreter (e.g. .venv-py310)")
    parser.add_argument(
        "--agent-site",
        type=Path,
        default=None,
        help="diagnostics: a directory put first on the agent's PYTHONPATH (e.g. holding a sitecustomize.py)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    single_thread_env()
    started = time.monotonic()
    print("agent_switch: request latency on the agent's endpoint, idle vs while the fleet updates the model")
    print(f"  machine: {describe()}")
    print(
        f"  {args.cycles} cycles of (idle {args.idle_s:g} s, good v{{2k}} with {args.padding_mib} MiB padding, idle, slow "
        f"v{{2k+1}} rolled back); {args.rate:g} req/s; health window {args.health_window_s:g} s; download "
        f"{'unthrottled' if args.bandwidth_kib_s is None else f'capped at {args.bandwidth_kib_s:g} KiB/s'}"
    )
    print(f"  agent interpreter: {args.agent_python}", end="")
    print(f", with {args.agent_site} first on its path" if args.agent_site is not None else "")
    print(f"  goals: 0 failed requests; p99 during the update <= {P99_RATIO_GOAL:g}x p99 idle", flush=True)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="agent-switch-", dir=args.workdir))
        result = run(args, work)
    else:
        with tempfile.TemporaryDirectory(prefix="agent-switch-") as tmp:
            result = run(args, Path(tmp))
    passed, summary = analyse(result, args)
    print(f"  total time {time.monotonic() - started:.0f} s")
    if args.json is not None:
        model, flags = cpu()
        report = {
            "machine": {"cpu": model, "flags": flags, "describe": describe()},
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            **summary,
            "cpu_samples": result["sampler"].rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"  wrote {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
