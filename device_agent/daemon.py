"""The agent: serving, telemetry, commands and OTA updates for one device, in one process.

``Agent(config).start()`` recovers from the journal, loads the active model, and starts the
threads: the OTA worker, the MQTT network loop and outbox publisher, the telemetry timer,
the local HTTP endpoint and the systemd watchdog. ``Agent.infer`` is the in-process API;
``edgeship agent run`` wraps ``start``/``stop`` around a signal wait.

Start-up, in order (docs/agent.md, "What happens at start"):

1. Take ``agent.lock`` (one agent per data directory).
2. If ``running`` is still there, the last stop was unclean: the active slot is re-hashed
   in full instead of trusting the digest pinned at install.
3. Load ``state.json`` (rebuilt from the slots if damaged). A deployment that had not ended
   is resumed: RESUME is journaled first, and a resume into a roll-back moves the active
   pointer back before any model is loaded.
4. Open the active slot. If it fails verification, the other slot is tried (only if it
   holds a committed model), otherwise the device serves nothing and says so.
5. Start the threads; report ``agent.started`` (and ``agent.recovered`` after an unclean stop).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgeship import __version__
from edgeship.device_agent import ota, protocol, systemd, telemetry
from edgeship.device_agent.config import AgentConfig
from edgeship.device_agent.http_api import InferenceServer
from edgeship.device_agent.outbox import Outbox
from edgeship.device_agent.serving import ActiveModel, Inputs, ModelHolder
from edgeship.device_agent.store import AgentState, SlotRecord, StateFileError, StateStore, boot_id, now
from edgeship.device_agent.topics import device_topic
from edgeship.device_agent.updater import Updater, failure_code
from edgeship.errors import EdgeshipError, UsageError
from edgeship.runtime import open as open_session
from edgeship.runtime.durable import fsync_dir, remove_tree, write_atomic
from edgeship.runtime.package import TrustedKeys, verify_directory

log = logging.getLogger("edgeship.device_agent")


class Agent:
    """One device's agent. Thread-safe public methods: ``infer``, ``stats``, ``install_local``."""

    def __init__(self, config: AgentConfig, *, serve_http: bool = True, connect: bool = True) -> None:
        self.config = config
        self.store = StateStore(config.data_dir)
        self.holder = ModelHolder()
        self.keys = TrustedKeys.load(config.updates.signing_keys)
        self.serve_http = serve_http
        self.connect = connect and config.broker is not None
        self.outbox: Outbox | None = None
        self.link: Any = None
        self.http: InferenceServer | None = None
        self.unclean: str | None = None
        self._lock_fd: int | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cpu = telemetry.CpuMeter()
        self._last_tick = time.monotonic()
        self._started_at = time.time()
        self._console_events = False
        self.updater = Updater(
            config,
            self.store,
            self.holder,
            emit=self.emit,
            open_slot=self.open_slot,
            keys=self.keys,
            trust_factory=self._make_trust if config.updates.metadata_url else None,
        )
        self.updater.emit_status = self.send_telemetry  # type: ignore[method-assign]

    # ----------------------------------------------------------------- topics

    def topic(self, channel: str) -> str:
        return device_topic(self.config.fleet_id, self.config.device_id, channel)

    # ----------------------------------------------------------------- start / stop

    def start(self) -> None:
        """Recover and start every part; returns once the agent serves (or knows it has nothing to serve)."""
        self._lock()
        self.store.prepare()
        marker = self.config.data_dir / "running"
        self.unclean = self._unclean_reason(marker)
        write_atomic(marker, json.dumps({"pid": os.getpid(), "boot_id": boot_id(), "started": time.time()}).encode())
        self.outbox = Outbox(
            self.config.data_dir / "outbox.sqlite",
            max_messages=self.config.telemetry.queue_max_messages,
            max_bytes=int(self.config.telemetry.queue_max_mib * (1 << 20)),
        )
        notes = self._recover()
        if self.connect:
            self._start_link()
        if self.serve_http:
            self._start_http()
        self.emit(
            "agent.started",
            model=self._model_ref(),
            details={"agent_version": __version__, "ota": self.updater.ota_state},
        )
        if self.unclean:
            self.emit("agent.recovered", code="unclean_stop", message=self.unclean, details={"actions": notes})
        self.updater.start()
        self._spawn(self._telemetry_loop, "edgeship-telemetry")
        self._spawn(self._watchdog_loop, "edgeship-watchdog")
        systemd.notify("READY=1")
        log.info("agent %s started: %s", self.config.device_id, self._describe())

    def stop(self) -> None:
        """Stop cleanly: finish in-flight requests, journal where the OTA is, say offline, release the lock."""
        if self._stop.is_set():
            return
        self._stop.set()
        systemd.notify("STOPPING=1")
        self.updater.stop()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        if self.link is not None:
            self.link.stop(offline=self._status("offline"))
        for thread in self._threads:
            thread.join(5)
        self.holder.close()
        if self.outbox is not None:
            self.outbox.close()
        marker = self.config.data_dir / "running"
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
            fsync_dir(self.config.data_dir)
        self._unlock()
        log.info("agent %s stopped", self.config.device_id)

    def run_forever(self) -> None:
        """``start``, then wait for SIGTERM/SIGINT, then ``stop`` (what ``edgeship agent run`` does)."""
        done = threading.Event()

        def _signal(signum: int, frame: Any) -> None:
            log.info("signal %d: stopping", signum)
            done.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        try:
            while not done.wait(1.0):
                pass
        finally:
            self.stop()

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _lock(self) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.config.data_dir / "agent.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(
                f"another edgeship agent (pid {other}) is using {self.config.data_dir}; stop it first, or give this one "
                "its own data_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @staticmethod
    def _unclean_reason(marker: Path) -> str | None:
        try:
            previous = json.loads(marker.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return "the previous agent did not stop cleanly"
        if previous.get("boot_id") and previous.get("boot_id") != boot_id():
            return "the device lost power or rebooted while the agent ran"
        return f"the previous agent (pid {previous.get('pid')}) was killed or crashed"

    # ----------------------------------------------------------------- recovery

    def _recover(self) -> list[str]:
        notes: list[str] = []
        try:
            state = self.store.load()
        except StateFileError as exc:
            notes.append(f"state.json was damaged ({exc}); rebuilt from the slots")
            state = self._rebuild_state()
            self.store.save(state)
        self.updater.state = state
        resumed = self.updater.resume()
        if resumed is not None:
            notes.append(
                f"resumed deployment {resumed.deployment_id} in {resumed.state.value} (attempt {resumed.attempts})"
            )
        self._clean_leftovers()
        notes += self._load_active()
        return notes

    def _rebuild_state(self) -> AgentState:
        """Without a usable state.json: trust only slots that verify in full; the newest becomes active."""
        best: tuple[int, str, SlotRecord] | None = None
        slots: dict[str, SlotRecord | None] = {"A": None, "B": None}
        for slot in slots:
            try:
                verified = verify_directory(self.store.slot_dir(slot), trusted_keys=self.keys)
            except EdgeshipError:
                continue
            m = verified.manifest
            if m.target not in self.config.accepted_targets:
                continue
            record = SlotRecord(m.name, m.version, verified.digest, m.target, m.format, m.precision, now())
            slots[slot] = record
            if best is None or m.version > best[0]:
                best = (m.version, slot, record)
        if best is None:
            return AgentState(slots=slots)
        return AgentState(active=best[1], slots=slots, committed={best[2].name: best[2].version})

    def _clean_leftovers(self) -> None:
        state = self.updater.state
        dep = state.ota
        for slot, record in state.slots.items():
            if record is None and slot != state.active and self.store.slot_dir(slot).exists():
                remove_tree(self.store.slot_dir(slot))
        keep = (
            {f"{dep.deployment_id}.edgepkg", f"{dep.deployment_id}.edgepkg.part"}
            if dep is not None and dep.state not in ota.TERMINAL
            else set()
        )
        for item in self.store.downloads.iterdir():
            if item.name not in keep:
                with contextlib.suppress(OSError):
                    item.unlink()

    def _load_active(self) -> list[str]:
        notes: list[str] = []
        state = self.updater.state
        slot = state.active
        record = state.active_record
        if slot is None or record is None:
            return notes
        try:
            self.holder.swap(self.open_slot(slot, record, rehash=self.unclean is not None))
            return notes
        except EdgeshipError as exc:
            notes.append(f"slot {slot} failed to open: {exc}")
            self.emit("slot.corrupt", code=failure_code(exc), message=f"slot {slot}: {exc}", details={"slot": slot})
        other = "B" if slot == "A" else "A"
        other_record = state.slots.get(other)
        dep = state.ota
        staged_elsewhere = (
            dep is not None
            and dep.state not in ota.TERMINAL
            and dep.staged_slot == other
            and dep.previous_slot != other
        )
        if other_record is not None and not staged_elsewhere:
            try:
                model = self.open_slot(other, other_record, rehash=True)
            except EdgeshipError as exc:
                notes.append(f"slot {other} failed to open too: {exc}")
            else:
                self.updater.save(replace(state, active=other))
                self.holder.swap(model)
                notes.append(f"serving slot {other} ({other_record.name} v{other_record.version}) instead")
                return notes
        self.updater.save(replace(state, active=None))
        notes.append("no verified model to serve: the device waits for a deployment")
        return notes

    def open_slot(self, slot: str, record: SlotRecord, rehash: bool = False) -> ActiveModel:
        """Open a slot's model pinned to the manifest digest recorded at install (``rehash``: check every file)."""
        session = open_session(
            self.store.slot_dir(slot),
            self.config.serve.backend,
            trusted_keys=self.keys,
            manifest_digest=record.digest,
            rehash=rehash,
            threads=self.config.serve.threads,
            cache_dir=self.config.data_dir / "engines",
            warmup=1,
        )
        return ActiveModel(session, slot, record)

    def _make_trust(self) -> Any:
        from edgeship.device_agent.tuf_client import UpdateTrust

        u = self.config.updates
        assert u.metadata_url is not None and u.targets_url is not None and u.root is not None
        return UpdateTrust(self.config.data_dir / "tuf", u.metadata_url, u.targets_url, u.root.read_bytes())

    # ----------------------------------------------------------------- MQTT and HTTP

    def _start_link(self) -> None:
        from edgeship.device_agent.mqtt_link import MqttLink

        assert self.config.broker is not None and self.outbox is not None
        self.link = MqttLink(
            self.config.broker,
            self.config.device_id,
            status_topic=self.topic("status"),
            cmd_topic=self.topic("cmd"),
            outbox=self.outbox,
            on_command=self.updater.submit_command,
            birth=lambda: self._status("online"),
            will=self._status("offline"),
        )
        self.link.start()

    def _start_http(self) -> None:
        token_path = self.config.data_dir / "admin.token"
        if not token_path.exists():
            write_atomic(token_path, secrets.token_urlsafe(24).encode(), mode=0o600)
        serve = self.config.serve
        try:
            self.http = InferenceServer(
                self, serve.host, serve.port, int(serve.max_body_mib * (1 << 20)), self._admin_token
            )
        except OSError as exc:
            raise UsageError(f"serve.port: cannot listen on {serve.host}:{serve.port} ({exc.strerror})") from None
        self.http.start()

    def _admin_token(self) -> str | None:
        try:
            return (self.config.data_dir / "admin.token").read_text().strip() or None
        except OSError:
            return None

    @property
    def url(self) -> str | None:
        return self.http.url if self.http is not None else None

    # ----------------------------------------------------------------- reporting

    def _model_ref(self) -> dict[str, Any] | None:
        model = self.holder.current
        return model.model_ref() if model is not None else None

    def _status(self, state: str) -> bytes:
        message = protocol.status(
            self.config.fleet_id,
            self.config.device_id,
            state,
            time.time(),
            agent_version=__version__,
            boot_id=boot_id() or "",
            model=self._model_ref() if state == "online" else None,
        )
        return protocol.encode(message)

    def emit(self, name: str, **fields: Any) -> None:
        """Queue an event for the fleet (durably ordered after the state it reports)."""
        fields = {k: v for k, v in fields.items() if v is not None}
        if self._console_events:
            log.warning("%s %s", name, " ".join(f"{k}={v}" for k, v in fields.items() if k != "details"))
        if self.outbox is None:
            return
        fleet, device = self.config.fleet_id, self.config.device_id

        def build(seq: int) -> bytes:
            message = protocol.event(fleet, device, seq, time.time(), name, **fields)
            protocol.check(message)
            return protocol.encode(message)

        try:
            self.outbox.put(self.topic("events"), build)
        except protocol.ProtocolError:
            log.exception("event %s does not follow the protocol (a bug); dropped", name)
        if (
            name == "ota.transition"
            and self.link is not None
            and fields.get("state") in ("HEALTH_CHECK", "ROLLED_BACK", "COMMITTED")
        ):
            self.link.publish_now(self.topic("status"), self._status("online"), retain=True)

    def telemetry_message(self, seq: int) -> dict[str, Any]:
        """One telemetry message: the model's window since the last one, the device's vitals, the queue."""
        model = self.holder.current
        snap: dict[str, Any] | None = None
        if model is not None:
            try:
                snap = model.session.stats_snapshot(reset=True)
            except EdgeshipError:
                snap = None
        latency = (snap or {}).get("latency") or {}
        dep = self.updater.state.ota
        message: dict[str, Any] = {
            "schema": protocol.SCHEMA,
            "type": "telemetry",
            "fleet": self.config.fleet_id,
            "device": self.config.device_id,
            "ts": time.time(),
            "seq": seq,
            "interval_s": self.config.telemetry.interval_s,
            "model": model.model_ref() if model is not None else None,
            "requests": int((snap or {}).get("requests", 0)),
            "errors": int((snap or {}).get("errors", 0)),
            "latency": {
                "count": int(latency.get("calls", 0) or 0),
                "p50_ms": latency.get("p50_ms"),
                "p99_ms": latency.get("p99_ms"),
                "mean_ms": latency.get("mean_ms"),
            },
            "system": {
                "cpu_percent": self._cpu.read(),
                "rss_mib": telemetry.rss_mib(),
                "temperature_c": telemetry.temperature_c(),
                "load1": telemetry.load1(),
            },
            "queue": {
                "depth": self.outbox.depth if self.outbox else 0,
                "dropped": self.outbox.dropped if self.outbox else 0,
            },
            "ota": {"state": self.updater.ota_state, "deployment_id": dep.deployment_id if dep is not None else None},
            "duplicates": self.updater.duplicates,
        }
        if snap is not None:
            message["drift"] = telemetry.drift_summary(snap)
        return message

    def send_telemetry(self) -> None:
        if self.outbox is None:
            return

        def build(seq: int) -> bytes:
            message = self.telemetry_message(seq)
            protocol.check(message)
            return protocol.encode(message)

        try:
            self.outbox.put(self.topic("telemetry"), build)
        except protocol.ProtocolError:
            log.exception("telemetry does not follow the protocol (a bug); dropped")

    def _telemetry_loop(self) -> None:
        interval = self.config.telemetry.interval_s
        next_at = time.monotonic() + interval
        while not self._stop.wait(max(next_at - time.monotonic(), 0.0)):
            next_at += interval
            if next_at < time.monotonic():  # fell behind (suspended device): do not burst
                next_at = time.monotonic() + interval
            self._last_tick = time.monotonic()
            try:
                self.send_telemetry()
            except Exception:
                log.exception("telemetry failed")

    def _watchdog_loop(self) -> None:
        interval = systemd.watchdog_interval()
        if interval is None:
            return
        while not self._stop.wait(interval):
            if self._alive():
                systemd.notify("WATCHDOG=1")
            else:
                log.error("a thread of the agent is stuck; not pinging the watchdog (systemd will restart us)")

    def _alive(self) -> bool:
        worker = self.updater._thread
        if worker is not None and not worker.is_alive():
            return False
        stale = time.monotonic() - self._last_tick > 3 * self.config.telemetry.interval_s + 30
        return not stale

    # ----------------------------------------------------------------- the in-process API

    def infer(self, inputs: Inputs) -> dict[str, Any]:
        """Run the serving model on ``inputs`` (a dict by name, or one array); returns outputs by name.

        Raises ``NoModelError`` when nothing is installed, ``InputError`` for bad inputs.
        """
        outputs, _ = self.holder.infer(inputs)
        return outputs

    def install_local(
        self, path: str | Path, *, health_window_s: float = 0.0, timeout: float | None = 600
    ) -> dict[str, Any]:
        """Apply a package from local disk through the OTA states (standalone mode); returns the final record."""
        return self.updater.install_local(path, health_window_s=health_window_s, timeout=timeout)

    def install_standalone(self, path: str | Path, *, health_window_s: float = 0.0) -> dict[str, Any]:
        """No agent runs: take the lock, recover, apply ``path`` here and now, release. Events go to the log."""
        self._console_events = True
        self._lock()
        try:
            self.store.prepare()
            self._recover()
            return self.updater.install_local(path, health_window_s=health_window_s)
        finally:
            self.holder.close()
            self._unlock()

    @property
    def ota_state(self) -> str:
        return self.updater.ota_state

    def stats(self) -> dict[str, Any]:
        """What ``GET /v1/stats`` answers: the model's statistics (not reset), the OTA state, the queue."""
        model = self.holder.current
        snap: dict[str, Any] | None = None
        if model is not None:
            with contextlib.suppress(EdgeshipError):
                snap = model.session.stats_snapshot()
        dep = self.updater.state.ota
        return {
            "model": model.model_ref() if model is not None else None,
            "stats": snap,
            "ota": dep.to_json() if dep is not None else {"state": "IDLE"},
            "progress": self.updater.progress,
            "queue": {
                "depth": self.outbox.depth if self.outbox else 0,
                "dropped": self.outbox.dropped if self.outbox else 0,
            },
            "mqtt": {
                "connected": bool(self.link is not None and self.link.connected.is_set()),
                "error": self.link.last_error if self.link is not None else None,
            },
            "uptime_s": round(time.time() - self._started_at, 1),
        }

    def _describe(self) -> str:
        model = self.holder.current
        what = (
            f"serving {model.record.name} v{model.record.version} from slot {model.slot}" if model else "no model yet"
        )
        where = f", http {self.url}" if self.http is not None else ""
        return f"{what}{where}, OTA {self.updater.ota_state}"
