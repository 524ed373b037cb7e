"""SIGKILL the device agent 1,000 times in the middle of OTA updates; count the devices left without a model.

Everything is real and comes from tests/device_agent/crash_harness.py (the harness the CI test
tests/device_agent/test_crash_safety.py runs with bounded counts): a mosquitto broker, a TUF
repository behind an HTTP server, signed packages (v1 installed on every device; v2 "good" with
``--padding-mib`` MiB of padding, v2 "slow" that the health window rolls back, v2 "bad_golden"
that fails validation), and ``python -m edgeship agent run`` processes, each device starting from
a copy of a data directory with v1 committed.

Kills, until their total reaches ``--kills``:

1. ``--rounds`` rounds of every point of ``TRANSITION_POINTS`` (the agent kills itself just
   before or just after the journal write that enters a state; one deployment per point);
2. random kills from outside: during a throttled download (12 MiB/s; each restart resumes it)
   and from VERIFYING on (verify, unpack, validation, activation), alternating so both get about
   half. The good package carries 96 MiB of padding by default (about MiniLM's size), so that
   verify + unpack lasts ~0.4 s and random kills land in it; with CI's 24 MiB it lasts ~50 ms and
   most "unpack" kills land in VALIDATING instead.

After every restart the agent must answer ``/v1/health`` with a model (else: "bricked"), and
every deployment must end as its package calls for (COMMITTED / ROLLED_BACK / FAILED) serving
the right version from a slot that verifies in full (else: a problem). Goal: 0 bricked, 0
problems. Also printed: kills per journaled state, restart-to-serving time (process start to the
first ``/v1/health`` answer), wall time, the CPU.

Reproduce::

    cd /work/main && .venv/bin/python -m benchmarks.ota_crash [--kills 1000] [--seed N] [--out results.json]

About 27 minutes for 1,000 kills on a 2-core machine (2026-12-06). Exit status 1 when a goal fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import cpu, describe, single_thread_env

PROGRESS_EVERY = 50


def _state_of(point: str) -> tuple[str, str]:
    """``before:STATE`` -> ("STATE", "before")."""
    when, state = point.split(":", 1)
    return state, when


class Tally:
    """Everything the run counts, one CrashResult at a time."""

    def __init__(self) -> None:
        self.results: list[Any] = []
        self.started = time.monotonic()
        self.kills_by_state: dict[str, Counter[str]] = {}
        self.final: dict[str, Counter[str]] = {}
        self.problems: list[str] = []
        self.restarts: list[float] = []
        self.bricked_deployments = 0
        self.bricked_events = 0

    @property
    def kills(self) -> int:
        return sum(r.kills for r in self.results)

    def add(self, result: Any, source: str) -> None:
        self.results.append(result)
        for where in result.killed_in:
            if ":" in where:  # a transition point
                state, column = _state_of(where)
            else:  # a random kill: the state journaled when it landed
                state, column = where, source
            self.kills_by_state.setdefault(state, Counter())[column] += 1
        self.final.setdefault(result.kind, Counter())[str(result.final_state)] += 1
        self.restarts.extend(result.restart_s)
        self.problems.extend(f"{result.name}: {p}" for p in result.problems)
        no_model = [p for p in result.problems if p.startswith("no model")]
        self.bricked_events += len(no_model)
        self.bricked_deployments += int(bool(no_model))


def _clean_devices(root: Path, keep: Path, result: Any) -> None:
    """Remove the finished devices' data (a deployment leaves ~50 MB); keep them when something went wrong."""
    devices = root / "devices"
    if not devices.is_dir():
        return
    for item in devices.iterdir():
        if result.problems:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.move(str(item), keep / item.name)
        elif item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)


def run(args: argparse.Namespace, work: Path) -> tuple[Tally, dict[str, Any]]:
    from edgeship.runtime.package import write_keypair
    from tests.device_agent.crash_harness import TRANSITION_POINTS, Rig, random_kills, transition_kill

    logging.getLogger("edgeship").setLevel(logging.ERROR)  # the rig's standalone v1 install logs every event
    key, pub = write_keypair(work / "keys", "publisher")
    t0 = time.monotonic()
    rig = Rig(work / "rig", key, pub, padding_mib=args.padding_mib)
    setup_s = time.monotonic() - t0
    keep = work / "kept"
    tally = Tally()
    rng = random.Random(args.seed)
    next_report = PROGRESS_EVERY
    kills_by_phase: Counter[str] = Counter()
    cases = [(kind, point) for kind, points in TRANSITION_POINTS.items() for point in points]

    def record(result: Any, source: str) -> None:
        nonlocal next_report
        tally.add(result, source)
        _clean_devices(rig.root, keep, result)
        if result.problems:
            print(f"  PROBLEM in {result.name}: {result.problems[0]}", flush=True)
        while tally.kills >= next_report:
            elapsed = time.monotonic() - tally.started
            print(
                f"[{tally.kills:5d}/{args.kills}] {elapsed / 60:5.1f} min  deployments {len(tally.results):4d}  "
                f"problems {len(tally.problems)}  bricked {tally.bricked_events}  "
                f"restart->serving p50 {np.median(tally.restarts) * 1e3 if tally.restarts else 0:.0f} ms  "
                f"last: {result.name} ({result.kills} kills, {result.final_state})",
                flush=True,
            )
            next_report += PROGRESS_EVERY

    try:
        for _round in range(args.rounds):
            for kind, point in cases:
                if tally.kills >= args.kills:
                    break
                record(transition_kill(rig, kind, point), "transition")
            else:
                continue
            break
        idle_rounds = 0
        while tally.kills < args.kills:
            # Keep the two kinds of random kill about even (a download deployment takes ~7, an unpack one ~4).
            phase = "download" if kills_by_phase["download"] <= kills_by_phase["unpack"] else "unpack"
            result = random_kills(rig, args.kills - tally.kills, rng, phase=phase)
            kills_by_phase[phase] += result.kills
            record(result, f"random {phase}")
            idle_rounds = idle_rounds + 1 if result.kills == 0 else 0
            if idle_rounds >= 10:
                print("  ten deployments in a row without a kill landing; stopping", flush=True)
                break
    finally:
        rig.close()
    return tally, {"setup_s": setup_s, "random_kills": dict(kills_by_phase), "kept": str(keep)}


def report(tally: Tally, extra: dict[str, Any], args: argparse.Namespace) -> bool:
    from tests.device_agent.crash_harness import EXPECTED

    wall = time.monotonic() - tally.started
    print()
    print(f"OTA crash safety: {tally.kills} SIGKILLs in {len(tally.results)} deployments, {wall / 60:.1f} min")
    print(f"  machine: {describe()}")
    print()
    columns = ["before", "after", "random download", "random unpack"]
    print(f"  {'kills per journaled state':<26}" + "".join(f"{c:>17}" for c in columns) + f"{'total':>8}")
    print("    (transition points count under the state whose journal write they surround)")
    order = [
        "DOWNLOADING",
        "VERIFYING",
        "STAGED",
        "VALIDATING",
        "ACTIVATING",
        "HEALTH_CHECK",
        "COMMITTED",
        "ROLLING_BACK",
        "ROLLED_BACK",
        "FAILED",
    ]
    states = order + sorted(set(tally.kills_by_state) - set(order))
    for state in states:
        counts = tally.kills_by_state.get(state)
        if not counts:
            continue
        print(f"  {state:<26}" + "".join(f"{counts.get(c, 0):>17}" for c in columns) + f"{sum(counts.values()):>8}")
    total = Counter[str]()
    for counts in tally.kills_by_state.values():
        total.update(counts)
    print(f"  {'all':<26}" + "".join(f"{total.get(c, 0):>17}" for c in columns) + f"{sum(total.values()):>8}")
    print()
    print("  deployments and how they ended:")
    by_kind = Counter(r.kind for r in tally.results)
    for kind, (want, version) in EXPECTED.items():
        ends = ", ".join(f"{state} {n}" for state, n in sorted(tally.final.get(kind, Counter()).items()))
        print(
            f"    {kind:<11} {by_kind.get(kind, 0):4d} deployments, expected {want} serving v{version}: {ends or '-'}"
        )
    r = np.array(tally.restarts) * 1e3
    print()
    if len(r):
        print(
            f"  restart -> serving (process start to first /v1/health answer), {len(r)} restarts: "
            f"mean {r.mean():.0f} ms, p50 {np.percentile(r, 50):.0f} ms, p99 {np.percentile(r, 99):.0f} ms, "
            f"max {r.max():.0f} ms"
        )
    print(f"  problems: {len(tally.problems)} (goal 0)")
    for p in tally.problems[:10]:
        print(f"    {p}")
    if tally.problems:
        print(f"    device data and logs of those deployments kept in {extra['kept']}")
    print(
        f"  bricked (no model right after a restart or at the end): {tally.bricked_events} "
        f"in {tally.bricked_deployments} deployments (goal 0)"
    )
    ok = tally.bricked_events == 0 and not tally.problems and tally.kills >= args.kills
    print(
        f"  GOAL 0 bricked: {'PASS' if tally.bricked_events == 0 else 'FAIL'}; "
        f"0 problems: {'PASS' if not tally.problems else 'FAIL'}; "
        f"{tally.kills} of {args.kills} kills landed"
    )
    print(f"  wall time {wall:.0f} s (rig set-up {extra['setup_s']:.1f} s)")

    if args.out is not None:
        model, flags = cpu()
        data = {
            "machine": {"cpu": model, "flags": flags, "describe": describe()},
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "kills": tally.kills,
            "deployments": len(tally.results),
            "kills_by_state": {s: dict(c) for s, c in tally.kills_by_state.items()},
            "final_states": {k: dict(c) for k, c in tally.final.items()},
            "problems": tally.problems,
            "bricked_events": tally.bricked_events,
            "bricked_deployments": tally.bricked_deployments,
            "restart_to_serving_ms": {
                "n": len(r),
                "mean": float(r.mean()) if len(r) else None,
                "p50": float(np.percentile(r, 50)) if len(r) else None,
                "p99": float(np.percentile(r, 99)) if len(r) else None,
                "max": float(r.max()) if len(r) else None,
            },
            "wall_s": wall,
            **extra,
            "results": [asdict(x) for x in tally.results],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1))
        print(f"  wrote {args.out}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=1000, help="total SIGKILLs (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every transition point (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    parser.add_argument(
        "--padding-mib",
        type=int,
        default=96,
        help="padding of the large good package, MiB (default 96, about MiniLM's size: verify+unpack ~0.4 s)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write every result as JSON here")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the rig and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    env = single_thread_env()
    print(f"ota_crash: {args.kills} kills, {args.rounds} rounds of transition points, seed {args.seed}")
    print(f"  machine: {describe()}")
    print(f"  env: {' '.join(f'{k}={v}' for k, v in env.items() if 'THREADS' in k)}")
    print("  goal: 0 bricked devices (a model served after every restart and at the end), 0 problems", flush=True)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="ota-crash-", dir=args.workdir))
        tally, extra = run(args, work)
    else:
        with tempfile.TemporaryDirectory(prefix="ota-crash-") as tmp:
            tally, extra = run(args, Path(tmp))
            if tally.problems:  # keep the evidence outside the temporary directory
                kept = Path(tempfile.mkdtemp(prefix="ota-crash-kept-"))
                if Path(extra["kept"]).exists():
                    shutil.copytree(extra["kept"], kept, dirs_exist_ok=True)
                extra["kept"] = str(kept)
    return 0 if report(tally, extra, args) else 1


if __name__ == "__main__":
    sys.exit(main())
