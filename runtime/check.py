"""Check a model package in a child process, so a crashing native interpreter kills the child, not the caller.

Child side, one JSON line on stdout::

    python -m edgeship.runtime.check SLOT --json [--key PUB]... [--no-signature] [--manifest-digest HEX]
        [--runs 50] [--warmup 5] [--threads N] [--max-latency-ms X] [--backend auto] [--option key=value]...

``SLOT`` is an unpacked package directory (an installed slot) or a ``.edgepkg`` file. The
child opens it (``edgeship.runtime.open``: verification, structural artifact checks,
backend load), runs its golden vectors, times ``--runs`` calls on the first golden case
after ``--warmup`` untimed ones, and prints::

    {"ok": bool, "code": CODE, "message": str, "name": str | null, "version": int | null,
     "backend": str | null, "library": str | null,
     "golden": GoldenResult.to_json() | null,
     "latency_ms": {"p50": float, "p99": float, "mean": float, "runs": int} | null}

========================  ====  ==========================================================
code                      exit  meaning
========================  ====  ==========================================================
``ok``                    0     golden vectors reproduced, latency within the budget
``golden_failed``         1     outputs differ from the golden vectors (or do not fit them)
``latency_budget``        1     median (p50) latency over ``--max-latency-ms``
``no_golden``             1     the package has no golden vectors to check
``package_error``         3     verification failed (signature, hashes, pinned digest, damaged artifact)
``load_failed``           4     no backend here can run it, or the native library refused it
``error``                 2     bad arguments or an unexpected error (the message says which)
========================  ====  ==========================================================

``--option key=value`` passes a backend setting (``Session`` ``**extra``), e.g.
``interpreter=tflite_runtime``; the value is read as JSON when it parses (``pool=2``), else
as a string. ``--threads`` sets the interpreter's intra-op threads.

Parent side: ``run_check`` spawns the child at a lower CPU priority (``os.nice`` inside the
child, before anything is imported, so the serving process keeps its CPU) and returns a
``CheckResult``. Besides the codes above it reports ``crashed`` (the child died of a
signal, e.g. SIGSEGV in the interpreter), ``timeout`` and ``error`` (no result line). It
never raises for anything the child does.

This module imports only the standard library at import time: the parent does not load
numpy or a backend to spawn a check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

OK = "ok"
CHILD_CODES: dict[str, int] = {
    "ok": 0,
    "golden_failed": 1,
    "latency_budget": 1,
    "no_golden": 1,
    "package_error": 3,
    "load_failed": 4,
    "error": 2,
}
"""Result codes the child reports, with its exit status for each."""
PARENT_CODES = ("crashed", "timeout")
"""Codes only ``run_check`` reports: the child died of a signal, or ran past the timeout."""

# The signals a native library dies of when it faults (SIGABRT: a failed assertion in C++).
_FAULTS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT})
_STDERR_TAIL = 20

# Runs in the child as `python -c`: lower the priority before anything else is imported, then run
# this module as __main__ with the remaining arguments.
_BOOTSTRAP = (
    "import os, runpy, sys\n"
    "n = int(sys.argv.pop(1))\n"
    "if n:\n"
    "    os.nice(n)\n"
    "runpy.run_module('edgeship.runtime.check', run_name='__main__', alter_sys=True)\n"
)


@dataclass(frozen=True)
class CheckResult:
    """The outcome of a package check (see the module docstring for ``code``).

    ``golden`` is ``GoldenResult.to_json()``; ``latency_ms`` has ``p50``, ``p99``, ``mean``
    (milliseconds) and ``runs``. ``returncode`` and ``stderr`` (its last lines) are the
    child's, for diagnosis; both are None/empty for a check run in this process.
    """

    ok: bool
    code: str
    message: str
    name: str | None = None
    version: int | None = None
    backend: str | None = None
    library: str | None = None
    golden: dict[str, Any] | None = None
    latency_ms: dict[str, Any] | None = None
    returncode: int | None = None
    stderr: str = ""

    def to_json(self) -> dict[str, Any]:
        """The result line's fields (``returncode`` and ``stderr`` are left out)."""
        out = asdict(self)
        del out["returncode"], out["stderr"]
        return out

    @property
    def exit_code(self) -> int:
        """The child's exit status for this code (2 for parent-only codes)."""
        return CHILD_CODES.get(self.code, 2)


# ---------------------------------------------------------------- child side


def check_slot(
    slot: str | os.PathLike[str],
    *,
    trusted_key_paths: Sequence[str | os.PathLike[str]] = (),
    verify_signature: bool = True,
    manifest_digest: str | None = None,
    runs: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    max_latency_ms: float | None = None,
    backend: str = "auto",
    options: Mapping[str, Any] | None = None,
) -> CheckResult:
    """Open ``slot`` in this process, run its golden vectors and a latency measurement, and say how it went.

    This is what the child runs; call ``run_check`` to get crash isolation. Returns a
    ``CheckResult`` for every outcome of the check (``returncode`` None); a native crash
    takes this process down with it.
    """
    from edgeship.errors import (
        BackendUnavailableError,
        EdgeshipError,
        InputError,
        ModelLoadError,
        PackageError,
    )
    from edgeship.runtime import open as open_session

    try:
        session = open_session(
            slot,
            backend,
            trusted_keys=list(trusted_key_paths) if verify_signature else None,
            verify_signature=verify_signature,
            manifest_digest=manifest_digest,
            threads=threads,
            stats=False,
            **dict(options or {}),
        )
    except PackageError as exc:
        return CheckResult(False, "package_error", str(exc))
    except (ModelLoadError, BackendUnavailableError) as exc:
        return CheckResult(False, "load_failed", str(exc))
    except EdgeshipError as exc:
        return CheckResult(False, "error", str(exc))

    manifest = session.manifest
    about: dict[str, Any] = {
        "name": manifest.name,
        "version": manifest.version,
        "backend": session.backend_name,
        "library": session.library or None,
    }
    golden: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    with session:
        try:
            if manifest.golden is not None:
                golden = session.check_golden().to_json()
            if runs > 0:
                latency = _measure(session, runs, warmup)
        except InputError as exc:
            return CheckResult(False, "golden_failed", f"the golden inputs do not fit the model: {exc}", **about)
        except PackageError as exc:
            return CheckResult(False, "package_error", str(exc), golden=golden, **about)
        except ModelLoadError as exc:
            return CheckResult(False, "load_failed", str(exc), golden=golden, **about)
        except EdgeshipError as exc:
            return CheckResult(False, "error", str(exc), golden=golden, **about)

    who = f"{manifest.name} version {manifest.version} on {session.backend_name}"
    timing = f"; p50 {latency['p50']:.3g} ms over {latency['runs']} runs" if latency else ""
    if golden is not None and not golden["passed"]:
        shown = "; ".join(golden["failures"][:3])
        more = f" (and {len(golden['failures']) - 3} more)" if len(golden["failures"]) > 3 else ""
        message = f"{who} does not reproduce its golden vectors: {shown}{more}"
        return CheckResult(False, "golden_failed", message, golden=golden, latency_ms=latency, **about)
    if golden is None:
        message = f"{who}: the package has no golden vectors, so its outputs cannot be checked{timing}"
        return CheckResult(False, "no_golden", message, latency_ms=latency, **about)
    if max_latency_ms is not None and latency is not None and latency["p50"] > max_latency_ms:
        message = f"{who}: median latency {latency['p50']:.3g} ms is over the budget of {max_latency_ms:g} ms"
        return CheckResult(False, "latency_budget", message, golden=golden, latency_ms=latency, **about)
    message = f"{who}: {golden['cases']} golden cases reproduced{timing}"
    return CheckResult(True, OK, message, golden=golden, latency_ms=latency, **about)


def _measure(session: Any, runs: int, warmup: int) -> dict[str, Any]:
    feeds = session.example_inputs()
    for _ in range(warmup):
        session.run(feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(feeds)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {
        "p50": _percentile(times, 50),
        "p99": _percentile(times, 99),
        "mean": sum(times) / len(times),
        "runs": runs,
    }


def _percentile(ordered: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on an already sorted list."""
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option takes key=value, not {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edgeship.runtime.check",
        description="Open a model package, run its golden vectors and a short latency measurement.",
    )
    parser.add_argument("slot", help="an unpacked package directory or a .edgepkg file")
    parser.add_argument("--json", action="store_true", help="print one JSON line (default: one line of text)")
    parser.add_argument("--key", action="append", default=[], help="a trusted public key (PEM); repeatable")
    parser.add_argument("--no-signature", action="store_true", help="skip the signature check, explicitly")
    parser.add_argument("--manifest-digest", help="SHA-256 of manifest.json recorded at install (pinned open)")
    parser.add_argument("--runs", type=int, default=50, help="timed runs (0: no latency measurement)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, help="intra-op threads of the interpreter")
    parser.add_argument("--max-latency-ms", type=float, help="fail when the median latency is over this")
    parser.add_argument("--backend", default="auto", help="backend name, or auto")
    parser.add_argument(
        "--option", type=_option, action="append", default=[], help="backend setting key=value; repeatable"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The child's entry point: run the check, print one line, return the exit status of its code."""
    args = _parser().parse_args(argv)
    if args.runs < 0 or args.warmup < 0:
        result = CheckResult(False, "error", "--runs and --warmup must not be negative")
    elif not args.no_signature and not args.key:
        result = CheckResult(False, "error", "no trusted key: pass --key PUB (or --no-signature, explicitly)")
    else:
        try:
            result = check_slot(
                args.slot,
                trusted_key_paths=args.key,
                verify_signature=not args.no_signature,
                manifest_digest=args.manifest_digest,
                runs=args.runs,
                warmup=args.warmup,
                threads=args.threads,
                max_latency_ms=args.max_latency_ms,
                backend=args.backend,
                options=dict(args.option),
            )
        except Exception as exc:  # the parent gets a line it can read, whatever went wrong here
            result = CheckResult(False, "error", f"unexpected {type(exc).__name__}: {exc}")
    if args.json:
        line = json.dumps(result.to_json(), allow_nan=False, default=str)
    else:
        line = f"{result.code}: {result.message}"
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    return result.exit_code


# ---------------------------------------------------------------- parent side


def run_check(
    slot: str | os.PathLike[str],
    *,
    trusted_key_paths: Sequence[str | os.PathLike[str]] = (),
    verify_signature: bool = True,
    manifest_digest: str | None = None,
    runs: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    max_latency_ms: float | None = None,
    backend: str = "auto",
    python: str | os.PathLike[str] = sys.executable,
    options: Mapping[str, Any] | None = None,
    timeout: float = 300.0,
    nice: int = 10,
) -> CheckResult:
    """Check ``slot`` in a child process (``python -m edgeship.runtime.check``) and return its ``CheckResult``.

    ``python`` is the interpreter to run (another venv, e.g. one with tflite-runtime, needs
    edgeship installed). The child runs at ``nice`` (0..19) lower priority and is killed
    after ``timeout`` seconds. Never raises for what the child does: a child killed by a
    signal gives code ``crashed`` (``"the model crashed the interpreter (SIGSEGV)"``), a
    timeout ``timeout``, and output without a result line ``error``. Raises ``UsageError``
    only for arguments that cannot be right (no keys while verifying, a negative ``nice``).
    """
    from edgeship.errors import UsageError

    if verify_signature and not trusted_key_paths:
        raise UsageError("no trusted keys: pass trusted_key_paths (or verify_signature=False, explicitly)")
    if not 0 <= nice <= 19:
        raise UsageError(f"nice must be 0..19 (a lower priority), not {nice}")
    argv = [os.fspath(python), "-c", _BOOTSTRAP, str(nice), os.fspath(slot), "--json"]
    argv += [f"--key={os.fspath(k)}" for k in trusted_key_paths] if verify_signature else ["--no-signature"]
    if manifest_digest is not None:
        argv.append(f"--manifest-digest={manifest_digest}")
    argv += [f"--runs={runs}", f"--warmup={warmup}", f"--backend={backend}"]
    if threads is not None:
        argv.append(f"--threads={threads}")
    if max_latency_ms is not None:
        argv.append(f"--max-latency-ms={max_latency_ms!r}")
    argv += [f"--option={key}={_option_text(value)}" for key, value in (options or {}).items()]
    try:
        proc = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        return CheckResult(
            False,
            "timeout",
            f"the check of {os.fspath(slot)} did not finish within {timeout:g} s (the model hangs or is far too slow)",
            stderr=_tail(exc.stderr),
        )
    except OSError as exc:
        return CheckResult(False, "error", f"cannot start {os.fspath(python)}: {exc.strerror or exc}")
    return _parse(proc.returncode, proc.stdout, proc.stderr)


def _option_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _tail(stream: str | bytes | None) -> str:
    if stream is None:
        return ""
    text = stream.decode("utf-8", "replace") if isinstance(stream, bytes) else stream
    return "\n".join(text.strip().splitlines()[-_STDERR_TAIL:])


def _parse(returncode: int, stdout: str, stderr: str) -> CheckResult:
    tail = _tail(stderr)
    if returncode < 0:
        return CheckResult(False, "crashed", _signal_message(-returncode), returncode=returncode, stderr=tail)
    line = next((x for x in reversed(stdout.splitlines()) if x.startswith("{")), None)
    try:
        obj = json.loads(line) if line is not None else None
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or obj.get("code") not in CHILD_CODES or not isinstance(obj.get("message"), str):
        last = tail.splitlines()[-1] if tail else "no output"
        return CheckResult(
            False,
            "error",
            f"the check process exited {returncode} without a result: {last}",
            returncode=returncode,
            stderr=tail,
        )
    fields = {k: obj.get(k) for k in ("name", "version", "backend", "library", "golden", "latency_ms")}
    ok = obj["code"] == OK and obj.get("ok") is True and returncode == 0
    return CheckResult(ok, obj["code"], obj["message"], **fields, returncode=returncode, stderr=tail)


def _signal_message(number: int) -> str:
    try:
        sig = signal.Signals(number)
    except ValueError:
        return f"the check process was killed by signal {number}"
    if sig in _FAULTS:
        return f"the model crashed the interpreter ({sig.name})"
    hint = " (out of memory?)" if sig == signal.SIGKILL else ""
    return f"the check process was killed by {sig.name}{hint}"


if __name__ == "__main__":
    sys.exit(main())
