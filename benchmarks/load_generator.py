"""An open-loop HTTP load generator in its own process, so its GIL and CPU do not ride on the agent's.

Child side::

    python -m benchmarks.load_generator --url http://127.0.0.1:PORT/v1/infer --body BODY.json
        --rate 50 [--connections 4] [--seconds S] --out RESULT.json

Requests are due at fixed times (``rate`` per second, from the start); ``connections`` threads,
each with its own keep-alive connection, take the next due request in turn, so one slow answer
does not hold the others back (open loop, up to ``connections`` in flight). It stops after
``--seconds`` or when ``stop`` (or end of file) arrives on stdin, then writes every request as
``[wall-clock send time (time.time()), latency s, HTTP status (-1: no answer), model header or
error name, lateness s]``: wall-clock times line up with the agent's event timestamps.

Parent side: ``LoadGenerator(url, body, rate).start()`` ... ``.stop()`` returns the ``Requests``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Requests:
    """What the generator recorded; one entry per request, in order of completion."""

    sent_at: list[float]  # time.time() when the request was sent
    latency_s: list[float]
    status: list[int]  # -1 when no answer came (connection refused or reset, timeout)
    model: list[str]  # X-Edgeship-Model of the answer, or the error's type name
    lateness_s: list[float]  # how late the request left against its due time (client-side queueing)

    @property
    def failed(self) -> int:
        return sum(1 for s in self.status if s != 200)

    def __len__(self) -> int:
        return len(self.status)


class LoadGenerator:
    """Runs ``python -m benchmarks.load_generator`` as a child process."""

    def __init__(
        self,
        url: str,
        body: bytes,
        rate: float,
        *,
        connections: int = 4,
        accept: str | None = None,
        python: str = sys.executable,
    ):
        self.url, self.body, self.rate, self.connections, self.python = url, body, rate, connections, python
        self.accept = accept
        self._tmp = tempfile.TemporaryDirectory(prefix="loadgen-")
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> LoadGenerator:
        tmp = Path(self._tmp.name)
        (tmp / "body.json").write_bytes(self.body)
        argv = [self.python, "-m", "benchmarks.load_generator", "--url", self.url, "--body", str(tmp / "body.json")]
        argv += ["--rate", str(self.rate), "--connections", str(self.connections), "--out", str(tmp / "out.json")]
        if self.accept:
            argv += ["--accept", self.accept]
        self._process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
        )
        return self

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def stop(self, timeout: float = 30.0) -> Requests:
        assert self._process is not None and self._process.stdin is not None
        try:
            self._process.stdin.write("stop\n")
            self._process.stdin.close()
        except BrokenPipeError:
            pass
        self._process.wait(timeout)
        data = json.loads((Path(self._tmp.name) / "out.json").read_text())
        self._tmp.cleanup()
        rows = data["records"]
        return Requests(
            [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows]
        )


def _run(args: argparse.Namespace) -> dict[str, Any]:
    parsed = urlparse(args.url)
    host, port, path = parsed.hostname or "127.0.0.1", parsed.port or 80, parsed.path or "/"
    body = Path(args.body).read_bytes()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    if args.accept:
        headers["Accept"] = args.accept
    period = 1.0 / args.rate
    stop = threading.Event()
    lock = threading.Lock()
    counter = [0]
    records: list[tuple[float, float, int, str, float]] = []
    t0 = time.perf_counter() + 0.05

    def worker() -> None:
        conn: http.client.HTTPConnection | None = None
        while not stop.is_set():
            with lock:
                i = counter[0]
                counter[0] += 1
            due = t0 + i * period
            delay = due - time.perf_counter()
            if delay > 0 and stop.wait(delay):
                break
            wall, start = time.time(), time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, port, timeout=args.timeout)
                conn.request("POST", path, body, headers)
                response = conn.getresponse()
                response.read()
                status, model = response.status, response.getheader("X-Edgeship-Model") or ""
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                status, model = -1, type(exc).__name__
                if conn is not None:
                    conn.close()
                conn = None
            records.append((wall, time.perf_counter() - start, status, model, max(start - due, 0.0)))
        if conn is not None:
            conn.close()

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.connections)]
    for t in threads:
        t.start()
    stop.wait(args.seconds)
    stop.set()
    for t in threads:
        t.join(args.timeout + 5)
    return {"rate": args.rate, "connections": args.connections, "records": sorted(records)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="file with the JSON request body")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long (default: on 'stop')")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, s")
    parser.add_argument("--accept", default=None, help="Accept header (default: none, the answer is JSON)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result = _run(args)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
