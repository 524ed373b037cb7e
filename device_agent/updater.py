"""The OTA worker: accepts commands, drives the state machine, performs its actions.

One worker thread owns the agent's state (``state.json``). For every event it asks the pure
``ota.step`` for the next state and the actions, writes the new state durably, reports the
transition, then performs the actions, whose outcome is the next event. Serving goes on in
other threads the whole time; only ACTIVATE and ROLL_BACK touch the serving model, and they
swap it in one step (``serving.ModelHolder``).

Failures are data, never crashes: every action turns an error into a FAILED (or UNHEALTHY)
event with a ``code`` (docs/ota.md lists them) and a one-line message, which the fleet sees as
an ``ota.error`` event. An unexpected exception is logged with its traceback and becomes
code ``internal``.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edgeship.device_agent import faults, ota, protocol
from edgeship.device_agent.config import AgentConfig
from edgeship.device_agent.download import DownloadInterrupted, download
from edgeship.device_agent.ota import Action, Deployment, Event, State
from edgeship.device_agent.serving import ActiveModel, Comparator, ModelHolder
from edgeship.device_agent.store import AgentState, QuarantineEntry, SlotRecord, StateStore, now
from edgeship.errors import (
    BackendUnavailableError,
    DownloadError,
    EdgeshipError,
    IntegrityError,
    ManifestError,
    MetadataExpiredError,
    MetadataRollbackError,
    ModelLoadError,
    PackageError,
    PackageFormatError,
    SignatureError,
    SizeLimitError,
    TargetMismatchError,
    TargetNotListedError,
    UnpackError,
    UntrustedKeyError,
    UpdateError,
    UpdateTrustError,
    VersionRollbackError,
)
from edgeship.runtime.durable import fsync_dir, fsync_file, remove_tree
from edgeship.runtime.package import TrustedKeys, read_manifest, unpack_package

if TYPE_CHECKING:
    from edgeship.device_agent.tuf_client import UpdateTrust

_T = TypeVar("_T")

log = logging.getLogger("edgeship.device_agent.ota")

Emit = Callable[..., None]
"""``emit(event_name, **fields)``: report an event (see protocol.EVENTS)."""
OpenSlot = Callable[[str, SlotRecord], ActiveModel]
"""Open a slot's model for serving (pinned to the digest recorded at install)."""


class Refused(UpdateError):
    """The device refuses a package for a reason of its own (wrong target, quarantined, not newer)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# Error types -> the ``code`` an ota.error event carries. First match wins (subclasses first).
FAILURE_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (MetadataExpiredError, "metadata_expired"),
    (MetadataRollbackError, "metadata_rollback"),
    (TargetNotListedError, "target_not_listed"),
    (TargetMismatchError, "hash_mismatch"),
    (UpdateTrustError, "metadata_untrusted"),
    (DownloadError, "download_failed"),
    (UntrustedKeyError, "untrusted_key"),
    (SignatureError, "bad_signature"),
    (VersionRollbackError, "version_not_newer"),
    (IntegrityError, "integrity"),
    (ManifestError, "bad_manifest"),
    (SizeLimitError, "too_large"),
    (UnpackError, "unpack_failed"),
    (PackageFormatError, "not_a_package"),
    (PackageError, "bad_package"),
    (ModelLoadError, "load_failed"),
    (BackendUnavailableError, "no_backend"),
)


def failure_code(exc: BaseException) -> str:
    if isinstance(exc, Refused):
        return exc.code
    for kind, code in FAILURE_CODES:
        if isinstance(exc, kind):
            return code
    return "internal"


@dataclass(frozen=True)
class Outcome:
    """What an action produced: the next event (None: wait, e.g. the agent is stopping)."""

    event: Event | None
    code: str | None = None
    message: str | None = None


_WAIT = Outcome(None)


class Updater:
    """Owns the agent state and the OTA worker thread. Construct, ``recover()``, then ``start()``."""

    def __init__(
        self,
        config: AgentConfig,
        store: StateStore,
        holder: ModelHolder,
        *,
        emit: Emit,
        open_slot: OpenSlot,
        keys: TrustedKeys,
        trust_factory: Callable[[], UpdateTrust] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.holder = holder
        self.emit = emit
        self.open_slot = open_slot
        self.keys = keys
        self._trust_factory = trust_factory
        self.state: AgentState = AgentState()
        self.stopping = threading.Event()
        self.interrupt = threading.Event()  # set to stop the current action (stopping or cancel)
        self._cancelled: str | None = None
        self._cancel_done: set[str] = set()
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.duplicates = 0
        self.progress: dict[str, Any] = {}
        self._pending: tuple[Action, ...] = ()
        self._ack: Callable[[], None] | None = None

    # ----------------------------------------------------------------- state

    def save(self, state: AgentState) -> None:
        """Write ``state`` durably and make it current. Everything that changes the state goes through here."""
        entering = state.ota is not None and (self.state.ota is None or state.ota.state is not self.state.ota.state)
        if entering and state.ota is not None:
            faults.point(f"before:{state.ota.state.value}")
        self.store.save(state)
        self.state = state
        if entering and state.ota is not None:
            faults.point(f"after:{state.ota.state.value}")

    @property
    def ota_state(self) -> str:
        dep = self.state.ota
        return dep.state.value if dep is not None else State.IDLE.value

    # ----------------------------------------------------------------- commands (any thread)

    def submit_command(self, payload: bytes, expiry_s: float | None, ack: Callable[[], None] = lambda: None) -> None:
        """Take a command from the broker; never blocks and never raises (bad input becomes an event).

        ``ack`` is called once the command is journaled or answered, never before: a command
        whose agent dies in between is delivered again by the broker.
        """
        try:
            message = protocol.parse(payload, expected=protocol.COMMAND_TYPES)
        except protocol.ProtocolError as exc:
            self.emit("cmd.rejected", code="malformed", message=str(exc))
            ack()
            return
        if expiry_s is not None and expiry_s <= 0:
            self.emit("cmd.rejected", code="expired", message=f"command {message['id']} expired in the broker's queue")
            ack()
            return
        if message["type"] == "cancel":
            dep = self.state.ota
            if dep is not None and dep.deployment_id == message["deployment_id"] and dep.state not in ota.TERMINAL:
                self._cancelled = dep.deployment_id
                self.interrupt.set()
        self._queue.put(("command", (message, ack)))

    def install_local(
        self, path: str | Path, *, health_window_s: float = 0.0, timeout: float | None = None
    ) -> dict[str, Any]:
        """Apply a package file from local disk through the same states (standalone mode); wait for the end.

        Returns the final deployment record. Raises ``UsageError``-like ``Refused`` when another update runs.
        """
        done: queue.Queue[Deployment] = queue.Queue(1)
        self._queue.put(("local", (str(path), health_window_s, done)))
        if self._thread is None:
            self._drain_once()
        try:
            result = done.get(timeout=timeout)
        except queue.Empty:
            raise UpdateError(
                f"the install of {path} did not finish within {timeout} s; see the agent's events"
            ) from None
        return result.to_json()

    # ----------------------------------------------------------------- recovery

    def resume(self) -> Deployment | None:
        """After a restart: feed RESUME to a journaled deployment that had not ended; return it.

        The resumed state is saved before anything else happens (its attempt counter is what
        stops a crash loop). When it resumes into a roll-back, the active pointer is moved back
        at once, so the serving model loaded next is the previous one, never the suspect one.
        The state's actions run when the worker starts.
        """
        dep = self.state.ota
        if dep is None or dep.state in ota.TERMINAL:
            return None
        new, actions = ota.step(dep, Event.RESUME)
        state = replace(self.state, ota=new)
        if new.state is State.ROLLING_BACK:
            prev = new.previous_slot
            state = replace(state, active=prev if prev is not None and state.slots.get(prev) is not None else None)
        self.save(state)
        self._report(dep, new)
        self._pending = actions
        return new

    # ----------------------------------------------------------------- the worker

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="edgeship-ota", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        self.interrupt.set()
        self._queue.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout)

    def _work(self) -> None:
        if self._pending:
            actions, self._pending = self._pending, ()
            self._handle("resume", actions)
        while not self.stopping.is_set():
            try:
                kind, item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if kind == "stop":
                break
            self._handle(kind, item)

    def _drain_once(self) -> None:
        """Without a worker thread (the CLI's standalone install): finish a resumed deployment, then
        handle what is queued, here."""
        if self._pending:
            actions, self._pending = self._pending, ()
            self._handle("resume", actions)
        while True:
            try:
                kind, item = self._queue.get_nowait()
            except queue.Empty:
                return
            self._handle(kind, item)

    def _handle(self, kind: str, item: Any) -> None:
        try:
            if kind == "resume":
                self._feed(self._feed_actions(item))
            elif kind == "command":
                message, ack = item
                self._ack = ack
                try:
                    self._command(message)
                finally:
                    self._acknowledge()
            elif kind == "local":
                self._local(*item)
        except Exception:  # the worker must survive its own bugs; the state file says where it was
            log.exception("OTA worker failed handling %s", kind)
            self.emit("ota.error", code="internal", message="the OTA worker hit an internal error; see the agent log")

    def _acknowledge(self) -> None:
        """Acknowledge the command being handled (once): after its first journal write, or its answer."""
        ack, self._ack = self._ack, None
        if ack is not None:
            ack()

    # ----------------------------------------------------------------- command handling

    def _command(self, message: Mapping[str, Any]) -> None:
        kind = message["type"]
        if kind == "deploy":
            self._deploy(message)
        elif kind == "cancel":
            dep = self.state.ota
            if dep is not None and dep.deployment_id == message["deployment_id"] and dep.state not in ota.TERMINAL:
                self._cancelled = None
                self.interrupt.clear()
                self._feed(Outcome(Event.CANCEL, "cancelled", f"cancelled by the fleet (command {message['id']})"))
            elif message["deployment_id"] in self._cancel_done:
                pass  # the interrupted action already turned it into CANCEL
            else:
                self.emit(
                    "cmd.rejected",
                    code="not_running",
                    message=f"deployment {message['deployment_id']} is not in progress",
                )
        elif kind == "clear_quarantine":
            keep: tuple[QuarantineEntry, ...] = ()
            if not message.get("all"):
                drop = {(v["name"], v["version"]) for v in message.get("versions", [])}
                keep = tuple(q for q in self.state.quarantine if (q.name, q.version) not in drop)
            self.save(replace(self.state, quarantine=keep))
            self.emit(
                "ota.transition", state=self.ota_state, code="quarantine_cleared", details={"remaining": len(keep)}
            )
        elif kind == "report":
            self.emit_status()

    def emit_status(self) -> None:
        """Hook for the daemon: a ``report`` command asks for telemetry now (replaced by the daemon)."""

    def _deploy(self, message: Mapping[str, Any]) -> None:
        dep_id = message["deployment_id"]
        current = self.state.ota
        if self.state.has_seen(dep_id):
            self.duplicates += 1
            if current is not None and current.deployment_id == dep_id:
                # Answer again with where it is: a fleet that lost our events learns the state.
                self.emit("ota.transition", deployment_id=dep_id, state=current.state.value, code="duplicate")
            return
        expires_at = message.get("expires_at")
        issued_at = float(message["issued_at"])
        t = now()
        if (expires_at is not None and expires_at < t) or t - issued_at > self.config.ota.command_max_age_s:
            self.emit(
                "cmd.rejected",
                deployment_id=dep_id,
                code="expired",
                message=f"deploy command {message['id']} expired before it arrived",
            )
            return
        if current is not None and current.state not in ota.TERMINAL:
            self.emit(
                "cmd.rejected",
                deployment_id=dep_id,
                code="busy",
                message=f"deployment {current.deployment_id} is in {current.state.value}; send again when it ends",
            )
            return
        if self.config.updates.metadata_url is None:
            self.emit(
                "cmd.rejected",
                deployment_id=dep_id,
                code="no_fleet",
                message="this agent has no updates.metadata_url configured",
            )
            return
        request = {k: message[k] for k in ("validation", "shadow", "health") if message.get(k) is not None}
        request.update(self._baseline())
        new = Deployment(
            deployment_id=dep_id,
            target_path=message["target_path"],
            state=current.state if current is not None else State.IDLE,
            source="fleet",
            request=request,
            previous_slot=self.state.active,
        )
        self.state = replace(self.state.remember(dep_id), ota=new)
        self._feed(Outcome(Event.DEPLOY))

    def _baseline(self) -> dict[str, Any]:
        """The serving model's latency when a deployment begins, and its histogram (to measure the load
        of the coming minutes by difference when the new model is activated)."""
        current = self.holder.current
        if current is None:
            return {}
        return {"baseline": current.latency_summary(), "baseline_counts": current.latency_counts()}

    def _local(self, path: str, health_window_s: float, done: queue.Queue[Deployment]) -> None:
        current = self.state.ota
        if current is not None and current.state not in ota.TERMINAL:
            failed = Deployment(
                deployment_id="local",
                target_path=path,
                state=State.FAILED,
                source="local",
                code="busy",
                message=f"deployment {current.deployment_id} is in {current.state.value}",
            )
            done.put(failed)
            return
        dep_id = f"local-{int(now() * 1000)}"
        new = Deployment(
            deployment_id=dep_id,
            target_path=str(Path(path).resolve()),
            state=current.state if current is not None else State.IDLE,
            source="local",
            request={"health": {"window_s": health_window_s}, **self._baseline()},
            previous_slot=self.state.active,
        )
        self.state = replace(self.state.remember(dep_id), ota=new)
        self._feed(Outcome(Event.DEPLOY))
        final = self.state.ota
        assert final is not None
        done.put(final)

    # ----------------------------------------------------------------- the machine

    def _feed(self, outcome: Outcome) -> None:
        while outcome.event is not None and not self.stopping.is_set():
            dep = self.state.ota
            assert dep is not None
            new, actions = ota.step(dep, outcome.event, code=outcome.code, message=outcome.message)
            self.save(replace(self.state, ota=new))
            self._acknowledge()  # the deploy command that started this is journaled now
            self._report(dep, new)
            outcome = self._feed_actions(actions)

    def _feed_actions(self, actions: tuple[Action, ...]) -> Outcome:
        """Perform actions in order; the last one's outcome is the next event."""
        outcome = _WAIT
        for action in actions:
            outcome = self._perform(action)
            if self.stopping.is_set():
                return _WAIT
        return outcome

    def _report(self, old: Deployment, new: Deployment) -> None:
        fields: dict[str, Any] = {
            "deployment_id": new.deployment_id,
            "state": new.state.value,
            "previous_state": old.state.value,
        }
        if new.code is not None and new.state in (State.FAILED, State.ROLLING_BACK, State.ROLLED_BACK):
            fields.update(code=new.code, message=new.message)
        if new.target.get("name") is not None:
            fields["details"] = {"name": new.target.get("name"), "version": new.target.get("version")}
        if new.state is State.FAILED or (new.state is State.ROLLING_BACK and old.state is not State.ROLLING_BACK):
            self.emit(
                "ota.error", deployment_id=new.deployment_id, state=new.state.value, code=new.code, message=new.message
            )
        if new.state is not old.state or new.attempts:
            self.emit("ota.transition", **fields)
        log.info(
            "deployment %s: %s -> %s%s",
            new.deployment_id,
            old.state.value,
            new.state.value,
            f" ({new.code}: {new.message})" if new.code and new.state in (State.FAILED, State.ROLLING_BACK) else "",
        )

    def _perform(self, action: Action) -> Outcome:
        handler = getattr(self, f"_do_{action.value.lower()}")
        try:
            result: Outcome = handler()
            return result
        except DownloadInterrupted:
            return self._interrupted()
        except EdgeshipError as exc:
            return Outcome(Event.FAILED, failure_code(exc), str(exc))
        except OSError as exc:
            code = "disk_full" if exc.errno == 28 else "io_error"
            return Outcome(Event.FAILED, code, f"{action.value.lower()}: {exc.strerror or exc}")
        except Exception as exc:
            log.exception("action %s failed", action.value)
            return Outcome(Event.FAILED, "internal", f"{action.value.lower()}: {type(exc).__name__}: {exc}")

    def _interrupted(self) -> Outcome:
        if self.stopping.is_set():
            return _WAIT
        if self._cancelled is not None:
            self._cancel_done.add(self._cancelled)
            self._cancelled = None
            self.interrupt.clear()
            return Outcome(Event.CANCEL, "cancelled", "cancelled by the fleet")
        self.interrupt.clear()
        return _WAIT

    def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; False when interrupted (stopping or cancelled)."""
        return not self.interrupt.wait(seconds)

    # ----------------------------------------------------------------- paths and checks

    def _dep(self) -> Deployment:
        dep = self.state.ota
        assert dep is not None
        return dep

    def _download_path(self, dep: Deployment) -> Path:
        return self.store.downloads / f"{dep.deployment_id}.edgepkg"

    def _trust(self) -> UpdateTrust:
        if self._trust_factory is None:
            raise Refused("no_fleet", "this agent has no updates.metadata_url configured")
        return self._trust_factory()

    def _floor(self, name: str, version: int, downgrade_from: list[int]) -> int | None:
        """The version a package must be newer than; None when the fleet's signed metadata allows this downgrade."""
        floor = self.state.committed.get(name)
        active = self.state.active_record
        if floor is None or version > floor:
            return floor
        if active is not None and active.name == name and active.version in downgrade_from and version < active.version:
            return None
        raise Refused(
            "version_not_newer",
            f"{name} version {version} is not newer than the committed version {floor}; "
            "a downgrade needs the fleet's signed permission (downgrade_from in its TUF metadata)",
        )

    def _precheck(self, name: str, version: int, target: str, downgrade_from: list[int]) -> int | None:
        if target not in self.config.accepted_targets:
            raise Refused(
                "wrong_target",
                f"package {name} v{version} is for target {target}; this device is {self.config.target}"
                f"{' (also accepts ' + ', '.join(self.config.updates.accept_targets) + ')' if self.config.updates.accept_targets else ''}",
            )
        quarantined = self.state.is_quarantined(name, version)
        if quarantined is not None:
            raise Refused(
                "quarantined",
                f"{name} v{version} was rolled back on this device ({quarantined.reason}); the fleet must clear it first",
            )
        return self._floor(name, version, downgrade_from)

    # ----------------------------------------------------------------- actions

    def _do_download(self) -> Outcome:
        dep = self._dep()
        dest = self._download_path(dep)
        if dep.source == "local":
            verified = read_manifest(dep.target_path, trusted_keys=self.keys)
            m = verified.manifest
            if self._is_active(m.name, m.version, verified.digest):
                return Outcome(
                    Event.ALREADY_INSTALLED, "already_installed", f"{m.name} v{m.version} is already the active model"
                )
            self._precheck(m.name, m.version, m.target, [])
            size = Path(dep.target_path).stat().st_size
            target = {
                "name": m.name,
                "version": m.version,
                "target": m.target,
                "manifest_sha256": verified.digest,
                "length": size,
            }
            self.save(replace(self.state, ota=replace(dep, target=target)))
            _copy_durably(Path(dep.target_path), dest)
            return Outcome(Event.DOWNLOADED)
        trust = self._trust()
        # The fleet's HTTP server may be restarting: the metadata lookup is retried like the download.
        offered = self._retrying("metadata lookup", lambda: trust.lookup(dep.target_path))
        meta = offered.edgeship
        try:
            name, version, target_name = str(meta["name"]), int(meta["version"]), str(meta["target"])
            digest = str(meta["manifest_sha256"])
            downgrade_from = [int(v) for v in meta.get("downgrade_from", [])]
        except (KeyError, TypeError, ValueError):
            raise Refused(
                "metadata_mismatch", f"the fleet's metadata for {dep.target_path} lacks edgeship's package fields"
            ) from None
        if self._is_active(name, version, digest):
            return Outcome(
                Event.ALREADY_INSTALLED, "already_installed", f"{name} v{version} is already the active model"
            )
        self._precheck(name, version, target_name, downgrade_from)
        _check_requirements(meta.get("requirements") or {})
        info = {
            "name": name,
            "version": version,
            "target": target_name,
            "manifest_sha256": digest,
            "downgrade_from": downgrade_from,
            "length": offered.length,
            "hashes": dict(offered.hashes),
            "url": offered.url,
        }
        if dep.target != info:
            self.save(replace(self.state, ota=replace(dep, target=info)))
        bandwidth = self.config.updates.bandwidth_kib_s
        self._retrying(
            "download",
            lambda: download(
                offered.url,
                dest,
                length=offered.length,
                timeout=self.config.updates.download_timeout_s,
                bandwidth_bytes_s=bandwidth * 1024 if bandwidth else None,
                stop=self.interrupt,
                progress=self._progress,
            ),
        )
        return Outcome(Event.DOWNLOADED)

    def _retrying(self, what: str, attempt_once: Callable[[], _T]) -> _T:
        """Run a network step up to 5 times, backing off 2, 4, 8, 16 s; an interrupt stops the waiting."""
        delay = 2.0
        for attempt in range(5):
            try:
                return attempt_once()
            except DownloadError as exc:
                if isinstance(exc, DownloadInterrupted) or attempt == 4:
                    raise
                log.info("%s attempt %d failed (%s); retrying in %.0f s", what, attempt + 1, exc, delay)
                if not self._wait(delay):
                    raise DownloadInterrupted(f"{what} interrupted") from None
                delay = min(delay * 2, 60.0)
        raise DownloadError(f"{what} failed")  # unreachable: the loop returns or raises

    def _progress(self, done: int, total: int) -> None:
        self.progress = {"bytes": done, "total": total}

    def _is_active(self, name: str, version: int, digest: str) -> bool:
        active = self.state.active_record
        return active is not None and active.name == name and active.version == version and active.digest == digest

    def _do_verify_and_stage(self) -> Outcome:
        dep = self._dep()
        path = self._download_path(dep)
        if dep.source == "fleet":
            from edgeship.device_agent.tuf_client import OfferedTarget, verify_file

            offered = OfferedTarget(
                path=dep.target_path,
                length=int(dep.target["length"]),
                hashes=dict(dep.target["hashes"]),
                custom={},
                url=str(dep.target["url"]),
            )
            try:
                verify_file(offered, path)
            except TargetMismatchError:
                path.unlink(missing_ok=True)  # a retry must download afresh
                raise
        slot = dep.staged_slot or self.state.inactive_slot()
        if slot == self.state.active:
            raise UpdateError(f"refusing to stage into the active slot {slot} (journal inconsistent)")
        self.save(replace(self.state.with_slot(slot, None), ota=replace(dep, staged_slot=slot)))
        slot_dir = self.store.slot_dir(slot)
        remove_tree(slot_dir)
        meta = dep.target
        floor = self._floor(str(meta["name"]), int(meta["version"]), list(meta.get("downgrade_from", [])))
        verified = unpack_package(path, slot_dir, trusted_keys=self.keys, last_installed_version=floor)
        m = verified.manifest
        if m.name != meta["name"] or m.version != meta["version"] or verified.digest != meta["manifest_sha256"]:
            raise Refused(
                "metadata_mismatch",
                f"the package is {m.name} v{m.version} (manifest {verified.digest[:12]}) but the fleet's metadata "
                f"says {meta['name']} v{meta['version']} ({str(meta['manifest_sha256'])[:12]})",
            )
        self._precheck(m.name, m.version, m.target, list(meta.get("downgrade_from", [])) if floor is None else [])
        record = SlotRecord(
            m.name, m.version, verified.digest, m.target, m.format, m.precision, now(), dep.deployment_id
        )
        self.save(self.state.with_slot(slot, record))
        return Outcome(Event.VERIFIED)

    def _do_begin_validation(self) -> Outcome:
        return Outcome(Event.PROCEED)

    def _do_validate(self) -> Outcome:
        from edgeship.runtime.check import run_check

        dep = self._dep()
        slot = dep.staged_slot
        record = self.state.slots.get(slot) if slot else None
        if slot is None or record is None:
            raise UpdateError("nothing is staged to validate (journal inconsistent)")
        validation = dep.request.get("validation") or {}
        defaults = self.config.ota
        max_ms = validation.get("max_latency_ms", defaults.max_latency_ms)
        result = run_check(
            self.store.slot_dir(slot),
            trusted_key_paths=list(self.config.updates.signing_keys),
            manifest_digest=record.digest,
            runs=int(validation.get("runs", defaults.validation_runs)),
            max_latency_ms=max_ms,
            threads=self.config.serve.threads,
        )
        self.save(replace(self.state, ota=replace(dep, target={**dep.target, "validation": result.to_json()})))
        if not result.ok:
            return Outcome(Event.FAILED, result.code, result.message)
        return Outcome(Event.NEEDS_SHADOW if dep.request.get("shadow") else Event.VALID)

    def _do_shadow(self) -> Outcome:
        dep = self._dep()
        params = dep.request.get("shadow") or {}
        slot = dep.staged_slot
        record = self.state.slots.get(slot) if slot else None
        if slot is None or record is None:
            raise UpdateError("nothing is staged for the shadow phase (journal inconsistent)")
        if self.holder.current is None:
            return Outcome(Event.SHADOW_OK)  # nothing serves, so there is nothing to compare against
        candidate = self.open_slot(slot, record)
        comparator = Comparator(candidate.session, float(params.get("fraction", 0.1)))
        self.holder.add_observer(comparator.observe)
        deadline = time.monotonic() + float(params.get("max_s", 300.0))
        wanted = int(params.get("min_requests", 100))
        try:
            while comparator.compared < wanted and time.monotonic() < deadline:
                if not self._wait(0.1):
                    return self._interrupted()
        finally:
            self.holder.remove_observer(comparator.observe)
            comparator.stop()
            candidate.session.close()
        snap = comparator.snapshot()
        self.save(replace(self.state, ota=replace(dep, target={**dep.target, "shadow": snap})))
        minimum = float(params.get("min_agreement", 0.95))
        agreement = snap["agreement"]
        if agreement is not None and agreement < minimum:
            return Outcome(
                Event.FAILED,
                "shadow_disagreement",
                f"the new model agreed with the serving one on {agreement:.1%} of {snap['compared']} live requests (minimum {minimum:.1%})",
            )
        return Outcome(Event.SHADOW_OK)

    def _do_activate(self) -> Outcome:
        dep = self._dep()
        slot = dep.staged_slot
        record = self.state.slots.get(slot) if slot else None
        if slot is None or record is None:
            raise UpdateError("nothing is staged to activate (journal inconsistent)")
        info = dict(dep.target)
        current = self.holder.current
        if current is not None and current.slot != slot and "baseline_counts" in dep.request:
            # The previous model under the load of the last minutes (the requests it served while this
            # deployment downloaded and validated), when there were enough of them: the new model will
            # be judged under that same load, not under the load of whenever the previous one started.
            recent = current.latency_summary(since=dep.request["baseline_counts"])
            request = {k: v for k, v in dep.request.items() if k != "baseline_counts"}
            if recent["requests"] >= LATENCY_MIN_REQUESTS:
                request["baseline"] = recent
            dep = replace(dep, request=request)
        # The switch: one atomic replace of state.json names the new slot active.
        self.save(replace(self.state, active=slot, ota=replace(dep, target=info)))
        if current is not None and current.slot == slot and current.record.digest == record.digest:
            model = current
        else:
            model = self.open_slot(slot, record)
        golden = model.session.check_golden()
        if not golden.passed:
            if model is not current:
                model.session.close()
            return Outcome(
                Event.FAILED,
                "golden_failed",
                "golden vectors fail in the serving process: " + "; ".join(golden.failures[:2]),
            )
        if model is not current:
            self.holder.swap(model)
        return Outcome(Event.ACTIVATED)

    def _do_watch_health(self) -> Outcome:
        dep = self._dep()
        params = {**_health_defaults(self.config), **(dep.request.get("health") or {})}
        window = float(params["window_s"])
        model = self.holder.current
        if model is None:
            return Outcome(Event.FAILED, "no_model", "the new model is not serving")
        comparator: Comparator | None = None
        reference: ActiveModel | None = None
        prev = dep.previous_slot
        prev_record = self.state.slots.get(prev) if prev else None
        if params.get("min_agreement") is not None and prev is not None and prev_record is not None:
            reference = self.open_slot(prev, prev_record)
            fraction = float((dep.request.get("shadow") or {}).get("fraction", 0.1))
            comparator = Comparator(reference.session, fraction)
            self.holder.add_observer(comparator.observe)
        start = time.monotonic()
        min_requests = int(params["min_requests"])
        try:
            while True:
                elapsed = time.monotonic() - start
                counts = model.counts()
                verdict = _judge(params, counts, model, dep.request.get("baseline"), comparator, final=False)
                if verdict is not None:
                    return Outcome(Event.UNHEALTHY, *verdict)
                if elapsed >= window and (counts[0] >= min_requests or elapsed >= 4 * window):
                    break
                if not self._wait(min(0.2, max(window - elapsed, 0.01))):
                    return self._interrupted()
            verdict = _judge(params, model.counts(), model, dep.request.get("baseline"), comparator, final=True)
            health = model.latency_summary()
            if comparator is not None:
                health["agreement"] = comparator.agreement
            self.save(replace(self.state, ota=replace(dep, target={**dep.target, "health": health})))
            if verdict is not None:
                return Outcome(Event.UNHEALTHY, *verdict)
            return Outcome(Event.HEALTHY)
        finally:
            if comparator is not None:
                self.holder.remove_observer(comparator.observe)
                comparator.stop()
            if reference is not None:
                reference.session.close()

    def _do_commit(self) -> Outcome:
        dep = self._dep()
        slot = dep.staged_slot
        record = self.state.slots.get(slot) if slot else None
        if record is not None:
            self.save(replace(self.state, committed={**self.state.committed, record.name: record.version}))
        self._download_path(dep).unlink(missing_ok=True)
        return _WAIT

    def _do_quarantine(self) -> Outcome:
        dep = self._dep()
        slot = dep.staged_slot
        record = self.state.slots.get(slot) if slot else None
        name = record.name if record is not None else dep.target.get("name")
        version = record.version if record is not None else dep.target.get("version")
        if name is None or version is None or self.state.is_quarantined(str(name), int(version)):
            return _WAIT
        entry = QuarantineEntry(str(name), int(version), dep.deployment_id, dep.code or "rolled back", now())
        self.save(replace(self.state, quarantine=(*self.state.quarantine, entry)))
        return _WAIT

    def _do_roll_back(self) -> Outcome:
        dep = self._dep()
        prev = dep.previous_slot
        record = self.state.slots.get(prev) if prev else None
        self.save(replace(self.state, active=prev if record is not None else None))
        current = self.holder.current
        if record is None or prev is None:
            self.holder.swap(None)
            return Outcome(Event.ROLLED_BACK)
        if current is not None and current.slot == prev and current.record.digest == record.digest:
            return Outcome(Event.ROLLED_BACK)
        try:
            model = self.open_slot(prev, record)
        except EdgeshipError as exc:
            # The previous slot does not open: the device can only serve nothing. Say so loudly.
            self.holder.swap(None)
            self.emit("slot.corrupt", code=failure_code(exc), message=f"slot {prev}: {exc}")
            return Outcome(Event.ROLLED_BACK)
        self.holder.swap(model)
        return Outcome(Event.ROLLED_BACK)

    def _do_discard(self) -> Outcome:
        dep = self._dep()
        path = self._download_path(dep)
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".part").unlink(missing_ok=True)
        slot = dep.staged_slot
        if slot is not None and slot != self.state.active and self.state.slots.get(slot) is not None:
            self.save(self.state.with_slot(slot, None))
        if slot is not None and slot != self.state.active:
            remove_tree(self.store.slot_dir(slot))
        return _WAIT


def _health_defaults(config: AgentConfig) -> dict[str, Any]:
    d = config.ota
    return {
        "window_s": d.health_window_s,
        "min_requests": d.health_min_requests,
        "max_error_rate": d.max_error_rate,
        "max_latency_ratio": d.max_latency_ratio,
        "min_agreement": d.min_agreement,
        "latency_slack_ms": d.latency_slack_ms,
    }


EARLY_MIN_REQUESTS = 20
"""Requests needed before the error-rate gate may fail early, before the window ends (noise guard)."""
LATENCY_MIN_REQUESTS = 100
"""Requests needed on each side before latencies are compared (a p99 of fewer says little)."""


def _judge(
    params: Mapping[str, Any],
    counts: tuple[int, int],
    model: ActiveModel,
    baseline: Mapping[str, Any] | None,
    comparator: Comparator | None,
    *,
    final: bool,
) -> tuple[str, str] | None:
    """The health gates; returns (code, message) of the first breached gate or None.

    Latency is compared at p50 and p99 with the previous model's (``baseline``: measured while it
    served during this deployment, under the same load, or before it began when there were too
    few requests), at the end of the window or once 500 requests were seen, with at least 100
    requests on each side. A breach needs both the ratio and an absolute increase over
    ``latency_slack_ms`` (1 ms by default): sub-millisecond differences are scheduling noise on a
    busy CPU, not a model that got slower.
    """
    requests, errors = counts
    enough = requests >= EARLY_MIN_REQUESTS
    if requests and (enough or final) and errors / requests > float(params["max_error_rate"]):
        return (
            "error_rate",
            f"{errors} of {requests} requests failed on the new model (limit {float(params['max_error_rate']):.1%})",
        )
    ratio = params.get("max_latency_ratio")
    latency_judged = final or requests >= 5 * LATENCY_MIN_REQUESTS
    if (
        ratio is not None
        and baseline
        and latency_judged
        and int(baseline.get("requests") or 0) >= LATENCY_MIN_REQUESTS
        and requests >= LATENCY_MIN_REQUESTS
    ):
        slack = float(params.get("latency_slack_ms", 1.0))
        for pct, key in ((50, "p50_ms"), (99, "p99_ms")):
            old = baseline.get(key)
            new = model.latency_ms(pct)
            if old and new is not None and new > float(ratio) * float(old) and new - float(old) > slack:
                return "latency", (
                    f"p{pct} latency {new:.2f} ms is over {float(ratio):g}x the previous model's {float(old):.2f} ms"
                )
    minimum = params.get("min_agreement")
    if (
        comparator is not None
        and minimum is not None
        and comparator.compared >= 10
        and (final or comparator.compared >= EARLY_MIN_REQUESTS)
    ):
        agreement = comparator.agreement
        if agreement is not None and agreement < float(minimum):
            return (
                "disagreement",
                f"the new model agreed with the previous one on {agreement:.1%} of {comparator.compared} requests",
            )
    return None


def _copy_durably(source: Path, dest: Path) -> None:
    """Copy a local package into the downloads directory (the USB stick may be pulled afterwards)."""
    tmp = dest.with_name(dest.name + ".part")
    with open(source, "rb") as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
        out.flush()
        fsync_file(out.fileno())
    tmp.replace(dest)
    fsync_dir(dest.parent)


def _check_requirements(requirements: Mapping[str, Any]) -> None:
    """Refuse early (before downloading) a package this device cannot run, from the fleet's signed requirements.

    The artifact format needs a backend that runs here; the model's memory need must fit in the memory
    available now; the runtime library must be of the major version the package was built for (a minor
    difference is allowed: the package's golden vectors decide, in the validation child).
    """
    from edgeship.runtime.backends.registry import select as select_backend

    fmt = requirements.get("format")
    if isinstance(fmt, str):
        try:
            backend = select_backend(fmt, device=True)
        except EdgeshipError as exc:  # BackendUnavailableError, or a format no backend knows
            raise Refused("unsupported", f"this device cannot run {fmt} models: {exc}") from None
        runtime = requirements.get("runtime") or {}
        wanted, have = str(runtime.get("version") or ""), _library_version(backend.name)
        same_library = runtime.get("name") == backend.name
        if same_library and wanted and have and wanted.split(".")[0] != have.split(".")[0]:
            raise Refused(
                "unsupported",
                f"the package needs {runtime.get('name')} {wanted}; this device has {backend.name} {have} (another major version)",
            )
    need = requirements.get("min_memory_mib")
    available = _available_memory_mib()
    if isinstance(need, (int, float)) and available is not None and need > available:
        raise Refused(
            "insufficient_memory",
            f"the model needs about {need:.0f} MiB and {available:.0f} MiB are available; free memory or deploy a smaller variant",
        )


def _library_version(backend: str) -> str | None:
    import importlib.metadata

    distribution = {"onnxruntime": "onnxruntime", "litert": "ai-edge-litert", "tensorrt": "tensorrt"}.get(backend)
    if distribution is None:
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _available_memory_mib() -> float | None:
    """MemAvailable from /proc/meminfo (Linux, Android); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None
