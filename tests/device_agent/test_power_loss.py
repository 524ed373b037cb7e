"""Power loss: every OTA journal step is on disk before the next one begins, checked on a real agent's syscalls.

SIGKILL (test_crash_safety.py) keeps every write the kernel accepted; a power cut keeps only
what was fsynced. A real agent runs under strace through three deployments (one that fails
validation, one committed after a shadow phase, one the health window rolls back), and
``syscall_trace`` replays its file-system calls on an ext4 model of the data directory: the
journal (``state.json``), the staged slot and the download must each be durable before the step
that relies on them, and before the event that reports them is queued.

The checker's own tests come first: synthetic traces with one fsync left out must be flagged, and
so must the real trace with any one of its fsyncs removed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from edgeship.device_agent.ota import State
from tests.agent_models import PackageSpec, build_package
from tests.device_agent.crash_harness import REPO_ROOT, AgentProcess, Rig, Traffic, _wait_for
from tests.device_agent.syscall_trace import (
    DiskModel,
    Report,
    Syscall,
    TraceError,
    check,
    find_strace,
    parse_trace,
    read_trace,
    scan_tree,
    strace_command,
    strace_problem,
    touching,
)

pytestmark = pytest.mark.py310

# python-tuf 7 writes its metadata cache without fsync (ngclient Updater._persist_file), renaming
# before any fsync; the agent fsyncs the cache's files and directories after every lookup
# (device_agent/tuf_client._sync_cache), which the rename-order rules here cannot express. A cut
# inside a lookup costs a re-download (ngclient treats a damaged file as absent), not a wedged device.
EXEMPT = {"tuf/": "python-tuf's metadata cache, written without fsync by ngclient (re-fetched when damaged)"}

# ----------------------------------------------------------------------------- synthetic traces

ROOT = "/dev-data"
SLOT_RECORD = {"name": "net", "version": 2, "digest": "d2"}
BEFORE: dict[str, Any] = {
    "active": "A",
    "slots": {"A": {"name": "net", "version": 1, "digest": "d1"}, "B": None},
    "ota": None,
}
TREE = {
    "state.json": "file",
    "slots": "dir",
    "slots/A": "dir",
    "slots/A/model.onnx": "file",
    "downloads": "dir",
    "tuf": "dir",
}


def _quote(data: bytes) -> str:
    out = []
    for byte in data:
        ch = chr(byte)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


class FakeTrace:
    """Lines as ``strace -f -tt -y`` prints them, for the checker's own tests; ``skip`` leaves one fsync out."""

    def __init__(self, skip: str | None = None) -> None:
        self.lines: list[str] = []
        self.skip = skip
        self.skipped = False
        self._fd = 2

    def call(self, text: str, tid: int = 100) -> None:
        n = len(self.lines)
        self.lines.append(f"{tid} 12:{n // 60:02d}:{n % 60:02d}.{n:06d} {text}")

    def fd(self, path: str) -> str:
        self._fd += 1
        return f"{self._fd}<{path}>"

    def create(self, path: str, data: bytes, *, sync: str | None = None) -> None:
        fd = self.fd(path)
        self.call(f'openat(AT_FDCWD</work>, "{path}", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0644) = {fd}')
        self.call(f"write({fd}, {_quote(data)}, {len(data)}) = {len(data)}")
        self.fsync(fd, sync)
        self.call(f"close({fd}) = 0")

    def fsync(self, fd: str, name: str | None) -> None:
        if name is not None and name == self.skip:
            self.skipped = True
            return
        self.call(f"fsync({fd}) = 0")

    def fsync_dir(self, path: str, name: str | None = None) -> None:
        fd = self.fd(path)
        self.call(f'openat(AT_FDCWD</work>, "{path}", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = {fd}')
        self.fsync(fd, name)
        self.call(f"close({fd}) = 0")

    def rename(self, old: str, new: str) -> None:
        self.call(f'rename("{old}", "{new}") = 0')

    def mkdir(self, path: str) -> None:
        self.call(f'mkdir("{path}", 0755) = 0')

    def journal(self, state: dict[str, Any], tag: str) -> None:
        """``write_atomic`` of ``state.json``, then the event that reports it (as ``StateStore.save`` does)."""
        tmp = f"{ROOT}/.state.json.{tag}.tmp"
        self.create(tmp, json.dumps(state, indent=1).encode(), sync=f"journal file {tag}")
        self.rename(tmp, f"{ROOT}/state.json")
        self.fsync_dir(ROOT, f"journal dir {tag}")
        wal = self.fd(f"{ROOT}/outbox.sqlite-wal")
        self.call(f'pwrite64({wal}, "\\0\\0", 2, 4096) = 2')

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _deployment(skip: str | None = None) -> FakeTrace:
    """A deployment as the agent performs it: journal, download, journal, unpack into B, journal, activate."""
    t = FakeTrace(skip)
    ota = {"deployment_id": "d1", "state": "DOWNLOADING", "staged_slot": None}
    t.journal({**BEFORE, "ota": ota}, "s1")
    part = f"{ROOT}/downloads/d1.edgepkg.part"
    t.create(part, b"package bytes", sync="download file")
    t.rename(part, f"{ROOT}/downloads/d1.edgepkg")
    t.fsync_dir(f"{ROOT}/downloads", "downloads dir")
    t.journal({**BEFORE, "ota": {**ota, "state": "VERIFYING", "staged_slot": "B"}}, "s2")
    staging = f"{ROOT}/slots/.B.partial-x1"
    t.mkdir(staging)
    t.create(f"{staging}/manifest.json", b"{}", sync="slot file")
    t.mkdir(f"{staging}/model")
    t.create(f"{staging}/model/model.onnx", b"onnx", sync="slot model file")
    t.fsync_dir(staging, "staging dir")
    t.fsync_dir(f"{staging}/model", "staging subdir")
    t.rename(staging, f"{ROOT}/slots/B")
    t.fsync_dir(f"{ROOT}/slots", "slots dir")
    staged = {**BEFORE, "slots": {**BEFORE["slots"], "B": SLOT_RECORD}}
    t.journal({**staged, "ota": {**ota, "state": "STAGED", "staged_slot": "B"}}, "s3")
    t.journal({**staged, "ota": {**ota, "state": "ACTIVATING", "staged_slot": "B"}}, "s4")
    t.journal({**staged, "active": "B", "ota": {**ota, "state": "ACTIVATING", "staged_slot": "B"}}, "s5")
    return t


def _check(text: str, **kwargs: Any) -> Report:
    return check(parse_trace(text), DiskModel(ROOT, TREE), initial_journal=BEFORE, cwd="/work", **kwargs)


def test_a_deployment_that_fsyncs_everything_in_order_passes():
    report = _check(_deployment().text())
    assert not report.violations, report.describe()
    assert report.states("d1") == ["DOWNLOADING", "VERIFYING", "STAGED", "ACTIVATING"]
    assert [p.rel for p in report.placements] == [
        "state.json",
        "downloads/d1.edgepkg",
        "state.json",
        "slots/B",
        "state.json",
        "state.json",
        "state.json",
    ]
    assert all(step.synced is not None for step in report.journal)


OMISSIONS = {
    "journal file s2": {"fsync-before-rename"},
    "journal dir s1": {"journal-before-events", "dir-fsync-before-next-step"},
    "download file": {"fsync-before-rename", "download-durable-before-journal"},
    "downloads dir": {"dir-fsync-before-next-step", "download-durable-before-journal"},
    "slot file": {"fsync-before-rename", "slot-durable-before-journal"},
    "slot model file": {"fsync-before-rename", "slot-durable-before-journal"},
    "staging dir": {"fsync-before-rename", "slot-durable-before-journal"},
    "staging subdir": {"fsync-before-rename", "slot-durable-before-journal"},
    "slots dir": {"dir-fsync-before-next-step", "slot-durable-before-journal"},
}


@pytest.mark.parametrize("omitted", sorted(OMISSIONS))
def test_a_deployment_missing_one_fsync_is_flagged_by_the_rule_it_breaks(omitted):
    trace = _deployment(skip=omitted)
    assert trace.skipped
    report = _check(trace.text())
    assert {v.rule for v in report.violations} == OMISSIONS[omitted], report.describe()
    assert all(str(v).startswith(f"[{v.rule}] trace line ") for v in report.violations)


def test_a_journal_step_begun_before_the_last_one_is_durable_is_flagged():
    t = FakeTrace()
    t.create(f"{ROOT}/.state.json.a.tmp", b'{"active": "A"}')
    t.rename(f"{ROOT}/.state.json.a.tmp", f"{ROOT}/state.json")
    t.journal({"active": "A"}, "b")  # begins while the first rename is not durable
    report = _check(t.text())
    assert [v.rule for v in report.violations] == ["dir-fsync-before-next-step"]
    assert report.violations[0].call.line == 5  # the rename, named by its trace line
    assert "not fsynced before the next journal step began (trace line 6)" in report.violations[0].message


@pytest.mark.parametrize(("tid", "flagged"), [(100, True), (200, False)], ids=["same-thread", "telemetry-thread"])
def test_an_event_queued_before_the_step_is_durable_is_flagged_when_it_reports_the_step(tid, flagged):
    t = FakeTrace()
    t.create(f"{ROOT}/.state.json.a.tmp", b'{"active": "A"}')
    t.rename(f"{ROOT}/.state.json.a.tmp", f"{ROOT}/state.json")
    t.call(f'pwrite64(9<{ROOT}/outbox.sqlite-wal>, "\\0", 1, 0) = 1', tid=tid)
    t.fsync_dir(ROOT)
    rules = [v.rule for v in _check(t.text()).violations]
    assert rules == (["journal-before-events"] if flagged else []), rules


def test_a_rename_whose_directory_is_never_fsynced_is_flagged_at_the_end():
    t = FakeTrace()
    t.create(f"{ROOT}/downloads/x.part", b"abc")
    t.rename(f"{ROOT}/downloads/x.part", f"{ROOT}/downloads/x.edgepkg")
    [violation] = _check(t.text()).violations
    assert violation.rule == "dir-fsync-before-next-step" and "never fsynced" in violation.message


def test_violations_under_an_exempted_path_are_listed_not_failed():
    t = FakeTrace(skip="tuf file")
    t.create(f"{ROOT}/tuf/tmp1", b"{}", sync="tuf file")
    t.rename(f"{ROOT}/tuf/tmp1", f"{ROOT}/tuf/timestamp.json")
    report = _check(t.text(), exempt=EXEMPT)
    assert not report.violations
    assert {v.rule for v, _ in report.exempted} == {"fsync-before-rename", "dir-fsync-before-next-step"}


def test_the_model_keeps_the_old_journal_until_the_directory_is_fsynced():
    t = FakeTrace(skip="running file")
    t.create(f"{ROOT}/.state.json.a.tmp", b"{}")
    t.rename(f"{ROOT}/.state.json.a.tmp", f"{ROOT}/state.json")
    t.create(f"{ROOT}/running", b"pid", sync="running file")
    model = DiskModel(ROOT, TREE)
    calls = parse_trace(t.text())
    for call in calls:
        model.apply(call)
    cut = model.power_cut()
    assert cut["state.json"].origin == "before the trace"  # the rename is not durable: the old file
    assert "running" not in cut and ".state.json.a.tmp" not in cut
    model.apply(parse_trace(f"100 13:00:00.000000 fsync(7<{ROOT}>) = 0\n")[0])
    cut = model.power_cut()
    assert cut["state.json"].origin == "line 1" and cut["state.json"].intact
    assert cut["running"].origin == "line 6" and not cut["running"].intact  # named, but its bytes may be gone
    assert model.problems(f"{ROOT}/running") == ["running has data written at line 7 and not fsynced since"]


def test_the_parser_joins_split_calls_and_decodes_strings():
    text = (
        '7 10:00:00.000001 openat(AT_FDCWD</w>, "a/b", O_RDWR|O_CREAT, 0600 <unfinished ...>\n'
        "8 10:00:00.000002 close(3</tmp/#12>(deleted)) = 0\n"
        "7 10:00:00.000003 <... openat resumed>) = 4</r/a/b>\n"
        '7 10:00:00.000004 write(4</r/a/b>, "{\\"k\\": \\"x) = 1\\"}\\n\\0\\377\\x7f", 17) = 17\n'
        '7 10:00:00.000005 write(4</r/a/b>, "abc"..., 99999) = 99999\n'
        "7 10:00:00.000006 +++ exited with 0 +++\n"
        '7 10:00:00.000007 unlinkat(5</r/a>, "b", 0) = -1 ENOENT (No such file or directory)\n'
    )
    closed, opened, written, cut, failed = parse_trace(text)  # in the order they returned
    assert (opened.name, opened.start_line, opened.line, opened.result_path) == ("openat", 1, 3, "/r/a/b")
    assert closed.fd() is not None and closed.fd().deleted  # type: ignore[union-attr]
    assert written.args[1].data == b'{"k": "x) = 1"}\n\x00\xff\x7f'  # type: ignore[union-attr]
    assert cut.args[1].cut  # type: ignore[union-attr]
    assert failed.errno == "ENOENT" and not failed.ok
    with pytest.raises(TraceError, match="trace line 1"):
        parse_trace("not strace output\n")


def test_a_journal_write_cut_short_by_strace_is_an_error_not_a_guess():
    tmp = f"{ROOT}/.state.json.a.tmp"
    text = (
        f'100 12:00:00.000001 openat(AT_FDCWD</w>, "{tmp}", O_RDWR|O_CREAT|O_EXCL, 0600) = 3<{tmp}>\n'
        f'100 12:00:00.000002 write(3<{tmp}>, "{{\\"active\\""..., 40000) = 40000\n'
        f"100 12:00:00.000003 fsync(3<{tmp}>) = 0\n"
        f'100 12:00:00.000004 rename("{tmp}", "{ROOT}/state.json") = 0\n'
    )
    with pytest.raises(TraceError, match=r"raise syscall_trace\.STRING_LIMIT"):
        _check(text)


# ----------------------------------------------------------------------------- a real agent under strace


class TracedAgent(AgentProcess):
    """``edgeship agent run`` under ``strace`` (``syscall_trace.strace_command``); signals go to the agent itself."""

    def __init__(self, config: Path, url: str, log: Path, trace: Path, strace: str) -> None:
        super().__init__(config, url, log)
        self.trace, self.strace = trace, strace

    def start(self) -> TracedAgent:
        config = ["--config", str(self.config), "--log-level", "warning"]
        command = [self.python, "-m", "edgeship", "agent", "run", *config]
        self.started_at = time.monotonic()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*strace_command(self.trace, strace=self.strace), *command],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO_ROOT,
            )
        return self

    def stop(self) -> None:
        """SIGTERM the agent (strace would detach and leave it running) and wait for strace to write the end."""
        if self.process is None or self.process.poll() is not None:
            return
        for pid in _children(self.process.pid):
            os.kill(pid, signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            for pid in _children(self.process.pid):
                os.kill(pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"the traced agent did not stop on SIGTERM: {self.tail()}") from None


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


# The three deployments, in the order one device receives them, and how each ends.
RUN = (("bad_golden", "FAILED"), ("good", "COMMITTED"), ("slow", "ROLLED_BACK"))


def _traced_deployments(rig: Rig, root: Path, strace: str) -> dict[str, Any]:
    """Deploy bad_golden (v2), good (v2, with a shadow phase), slow (v3) to one traced agent; return what happened."""
    name, config, url, data = rig.device("power")
    tree = scan_tree(data)
    initial = json.loads((data / "state.json").read_bytes())
    trace = root / "agent.strace"
    agent = TracedAgent(config, url, root / "agent.log", trace, strace)
    traffic: Traffic | None = None
    deployments: dict[str, str] = {}
    heard: dict[str, list[str]] = {}
    started = time.time()
    try:
        agent.start()
        agent.wait_ready()
        rig.fleet.wait_online(name, since=started)
        traffic = requests = Traffic(url)  # the health window's latency gate and the shadow phase need live requests
        assert _wait_for(lambda: requests.ok >= 40, 30), "no traffic reached the agent"
        for kind, end in RUN:
            extra: dict[str, Any] = {}
            if kind == "good":
                # SHADOW is journaled only when asked for; the latency gate is there for the slow model,
                # and a loaded CI machine must not fail the good one with it.
                extra["shadow"] = {"fraction": 1.0, "min_requests": 5, "max_s": 20, "min_agreement": 0.0}
                extra["health"] = {"max_latency_ratio": None}
            dep = rig.fleet.deploy(rig.targets[kind], device=name, **extra)
            final = rig.fleet.wait_end(dep, device=name, timeout=120)
            assert final["state"] == end, (kind, final, agent.tail())
            deployments[kind] = dep
            heard[kind] = rig.fleet.states(dep, device=name)
    finally:
        if traffic is not None:
            traffic.stop()
        agent.stop()
    return {"data": data, "tree": tree, "initial": initial, "trace": trace, "deployments": deployments, "heard": heard}


def _replay(calls: list[Syscall], run: dict[str, Any]) -> Report:
    return check(
        calls,
        DiskModel(run["data"], run["tree"]),
        initial_journal=run["initial"],
        exempt=EXEMPT,
        cwd=str(REPO_ROOT),
    )


def test_every_journal_step_is_durable_before_the_next_one_begins(tmp_path, publisher_files):
    strace = find_strace()
    problem = strace_problem(strace)
    if problem is not None:
        pytest.skip(problem)
    root = tmp_path.resolve()  # -y prints resolved paths; the config must use the same ones
    (root / "rig").mkdir()
    rig = Rig(root / "rig", publisher_files.key_path, publisher_files.pub_path, padding_mib=1)
    try:
        # A second v2 could not follow the committed one: the roll-back case gets its own version.
        slow = build_package(
            root / "slow-v3.edgepkg", publisher_files.key, PackageSpec(version=3, kind="slow", slow_layers=24)
        )
        rig.targets["slow"] = rig.fleet.publish(slow, path="power/slow-v3.edgepkg")
        assert strace is not None
        run = _traced_deployments(rig, root, strace)
    finally:
        rig.close()

    calls = touching(read_trace(run["trace"]), run["data"], cwd=str(REPO_ROOT))
    report = _replay(calls, run)
    assert not report.violations, report.describe()
    assert {p.rel.split("/")[0] for p in report.placements if p.exempt} <= {"tuf"}

    # The journal, read from the trace, went through the states the fleet heard, in the same order.
    for kind, dep in run["deployments"].items():
        assert report.states(dep) == run["heard"][kind], (kind, report.states(dep), run["heard"][kind])
    journaled = {step.ota.get("state") for step in report.journal}
    assert journaled == {s.value for s in State} - {"IDLE"}, journaled
    assert all(step.synced is not None for step in report.journal), "a journal step never became durable"
    placed = [p.rel.split("/")[0] for p in report.placements]
    assert placed.count("slots") == 3 and placed.count("downloads") == 3, placed

    # The checker sees every fsync that matters here: without any one of them, the run is flagged.
    last_journal = report.journal[-1].call
    omissions = [
        (placement, sync)
        for placement in report.placements
        if placement.exempt is None and placement.rel.split("/")[0] in ("state.json", "slots", "downloads")
        for sync in placement.syncs
        # the very last step: the agent's own fsync of the data directory at stop also makes it durable
        if not (placement.call is last_journal and sync is placement.dir_sync)
    ]
    unnoticed = [
        f"line {sync.line} (made {placement.rel} durable): {sync.excerpt()}"
        for placement, sync in omissions
        if not _replay([c for c in calls if c is not sync], run).violations
    ]
    assert not unnoticed, "fsyncs whose omission the checker would not notice:\n" + "\n".join(unnoticed)
    assert len(omissions) > 2 * len(report.journal)
