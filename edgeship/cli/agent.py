"""``edgeship agent``: run the device agent, install a package locally, show its state."""

from __future__ import annotations

import json
import logging
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from edgeship.errors import EdgeshipError, UpdateError, UsageError

app = typer.Typer(no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)

ConfigOption = typer.Option(..., "--config", "-c", metavar="agent.yaml", help="The agent's configuration file.")


def _config(path: Path):  # type: ignore[no-untyped-def]
    from edgeship.device_agent.config import load_config

    return load_config(path)


@app.command("run")
def run(
    config: Path = ConfigOption,
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Run the agent in the foreground (systemd runs this): serve the model on the local HTTP endpoint,
    report telemetry over MQTT, apply OTA updates from the fleet. Stops cleanly on SIGTERM/SIGINT."""
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise UsageError(f"--log-level: use debug, info, warning or error, not {log_level!r}")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from edgeship.device_agent.daemon import Agent

    Agent(_config(config)).run_forever()


@app.command("install")
def install(
    package: Path = typer.Argument(..., help="A .edgepkg file on local disk (e.g. a USB stick)."),
    config: Path = ConfigOption,
    health_window: float = typer.Option(
        0.0, "--health-window", help="Seconds to watch the new model before committing."
    ),
) -> None:
    """Apply a package from local disk through the same OTA states and journal as a fleet update
    (verify, stage in the inactive slot, validate in a child process, activate, commit or roll back).
    Talks to the running agent when there is one; otherwise works on the data directory itself."""
    if not package.is_file():
        raise UsageError(f"{package} does not exist")
    cfg = _config(config)
    outcome = _install_via_daemon(cfg, package.resolve(), health_window)
    if outcome is None:
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
        from edgeship.device_agent.daemon import Agent

        outcome = Agent(cfg, serve_http=False, connect=False).install_standalone(package, health_window_s=health_window)
    state, code, message = outcome.get("state"), outcome.get("code"), outcome.get("message")
    target = outcome.get("target") or {}
    what = f"{target.get('name', package.name)} v{target.get('version', '?')}"
    if state == "COMMITTED":
        console.print(f"installed {what}: {state} (slot {outcome.get('staged_slot')})")
        return
    raise UpdateError(f"{what} not installed: {state} ({code}: {message})")


def _install_via_daemon(cfg, package: Path, health_window: float) -> dict | None:  # type: ignore[no-untyped-def,type-arg]
    """Hand the package to a running agent over its local endpoint; None when no agent runs."""
    token_path = cfg.data_dir / "admin.token"
    lock = cfg.data_dir / "agent.lock"
    if not lock.exists() or not token_path.exists() or not _locked(lock):
        return None
    url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1/admin/install"
    body = json.dumps({"path": str(package), "health_window_s": health_window}).encode()
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token_path.read_text().strip()}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=3600) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}").get("error", exc.reason)
        raise UpdateError(f"the running agent refused the install: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise UsageError(f"an agent holds {lock} but does not answer on {url} ({exc}); is serve.port right?") from None


def _locked(lock: Path) -> bool:
    import fcntl
    import os

    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


@app.command("status")
def status(config: Path = ConfigOption, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show the slots, the active model, the OTA journal and the quarantine (read from the data directory)."""
    from edgeship.device_agent.store import StateStore

    cfg = _config(config)
    state = StateStore(cfg.data_dir).load()
    if as_json:
        print(json.dumps(state.to_json(), indent=2))
        return
    table = Table("slot", "model", "version", "target", "precision", "digest", "active")
    for slot, record in state.slots.items():
        if record is None:
            table.add_row(slot, "-", "", "", "", "", "")
        else:
            table.add_row(
                slot,
                record.name,
                str(record.version),
                record.target,
                record.precision,
                record.digest[:12],
                "yes" if state.active == slot else "",
            )
    console.print(table)
    dep = state.ota
    if dep is not None:
        extra = f" ({dep.code}: {dep.message})" if dep.code else ""
        console.print(f"last deployment {dep.deployment_id}: {dep.state.value}{extra}")
    for q in state.quarantine:
        console.print(f"quarantined: {q.name} v{q.version} ({q.reason}, deployment {q.deployment_id})")


@app.command("verify")
def verify(config: Path = ConfigOption) -> None:
    """Re-hash every installed slot against the manifest digest pinned at install (the agent itself does
    this only after an unclean stop). Exits 3 when a slot no longer matches. Safe while the agent runs."""
    from edgeship.device_agent.store import StateStore
    from edgeship.errors import PackageError
    from edgeship.runtime.package import TrustedKeys, verify_directory

    cfg = _config(config)
    store = StateStore(cfg.data_dir)
    state = store.load()
    keys = TrustedKeys.load(cfg.updates.signing_keys)
    bad = 0
    for slot, record in state.slots.items():
        if record is None:
            continue
        try:
            verify_directory(store.slot_dir(slot), trusted_keys=keys, manifest_digest=record.digest, rehash=True)
            console.print(
                f"slot {slot}: {record.name} v{record.version} OK{' (active)' if state.active == slot else ''}"
            )
        except PackageError as exc:
            bad += 1
            console.print(f"slot {slot}: {record.name} v{record.version} DAMAGED: {exc}")
    if bad:
        raise PackageError(
            f"{bad} slot(s) no longer match what was installed; reinstall from the fleet or a package file"
        )


@app.command("enroll")
def enroll(
    fleet: str = typer.Option(..., "--fleet", metavar="URL", help="The fleet's URL, e.g. https://fleet.example.com."),
    token: str = typer.Option(..., "--token", envvar="EDGESHIP_ENROLL_TOKEN", help="The one-time enrollment token."),
    device_id: str = typer.Option(..., "--device-id", help="This device's id (its MQTT username)."),
    target: str = typer.Option(..., "--target", help="This device's target profile (edgeship targets list)."),
    tag: list[str] = typer.Option([], "--tag", metavar="KEY=VALUE", help="A tag for this device; repeatable."),
    data_dir: Path = typer.Option(..., "--data-dir", help="The agent's data directory (written to agent.yaml)."),
    out: Path = typer.Option(..., "--out", metavar="agent.yaml", help="The agent configuration to write."),
) -> None:
    """Enroll this device with a fleet: trade the one-time token for broker credentials, the fleet's TUF root
    and the package signing keys, and write agent.yaml with the password file (0600), CA, root.json and keys
    next to it. Refuses to overwrite any of those files (the token works once)."""
    tags: dict[str, str] = {}
    for item in tag:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--tag {item!r}: write key=value")
        tags[key] = value
    folder = out.parent
    password_file, ca_file, root_file = folder / "mqtt-password", folder / "ca.pem", folder / "root.json"
    for path in (out, password_file, ca_file, root_file, *folder.glob("signing-key-*.pem")):
        if path.exists():
            raise UsageError(f"{path} exists; enroll into an empty directory (an enrollment token works once)")
    body = json.dumps({"token": token, "device_id": device_id, "target": target, "tags": tags}).encode()
    url = fleet.rstrip("/") + "/api/v1/enroll"
    bundle = _post_enroll(url, body)
    folder.mkdir(parents=True, exist_ok=True)
    written = _write_bundle(bundle, out, data_dir, password_file, ca_file, root_file)
    from edgeship.device_agent.config import load_config

    load_config(out)  # what was written must load: a fleet answering nonsense is caught here, not at start-up
    for path in written:
        console.print(f"wrote {path}")
    shown = " ".join(f"{k}={v}" for k, v in sorted((bundle.get("tags") or {}).items()))
    console.print(
        f"enrolled {bundle['device_id']} in fleet {bundle['fleet_id']} as {bundle['target']}"
        + (f" with tags {shown}" if shown else "")
        + f"; start the agent with: edgeship agent run --config {out}"
    )


def _post_enroll(url: str, body: bytes) -> dict[str, Any]:
    from edgeship.errors import AuthError, ConflictError

    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read() or b"{}").get("error") or exc.reason
        except ValueError:
            detail = exc.reason
        kind = {401: AuthError, 409: ConflictError, 422: UsageError}.get(exc.code, EdgeshipError)
        raise kind(f"the fleet refused the enrollment: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise EdgeshipError(f"cannot reach the fleet at {url}: {getattr(exc, 'reason', exc)}") from None
    except ValueError:
        raise EdgeshipError(f"the fleet at {url} did not answer with JSON; is that the fleet's URL?") from None
    if not isinstance(answer, dict) or not {"device_id", "fleet_id", "target", "broker", "updates"} <= set(answer):
        raise EdgeshipError(f"the fleet at {url} answered without an agent bundle; is that the fleet's URL?")
    return answer


def _write_bundle(
    bundle: dict[str, Any], out: Path, data_dir: Path, password_file: Path, ca_file: Path, root_file: Path
) -> list[Path]:
    import yaml

    from edgeship.runtime.durable import write_atomic

    broker, updates = bundle["broker"], bundle["updates"]
    folder = out.parent
    written: list[Path] = []
    write_atomic(password_file, (broker["password"] + "\n").encode(), mode=0o600)
    written.append(password_file)
    write_atomic(root_file, updates["root_json"].encode())
    written.append(root_file)
    key_names: list[str] = []
    for i, pem in enumerate(updates["signing_keys_pem"], start=1):
        key_file = folder / f"signing-key-{i}.pem"
        write_atomic(key_file, pem.encode())
        written.append(key_file)
        key_names.append(key_file.name)
    broker_section: dict[str, Any] = {
        "url": broker["url"],
        "username": broker["username"],
        "password_file": password_file.name,
    }
    if broker.get("ca_pem"):
        write_atomic(ca_file, broker["ca_pem"].encode())
        written.append(ca_file)
        if str(broker["url"]).startswith("mqtts://"):
            broker_section["ca_file"] = ca_file.name
    config = {
        "device_id": bundle["device_id"],
        "fleet_id": bundle["fleet_id"],
        "target": bundle["target"],
        "data_dir": str(data_dir.expanduser().resolve()),
        "broker": broker_section,
        "updates": {
            "metadata_url": updates["metadata_url"],
            "targets_url": updates["targets_url"],
            "root": root_file.name,
            "signing_keys": key_names,
        },
    }
    header = "# Written by 'edgeship agent enroll'. Paths are relative to this file; docs/agent.md explains each key.\n"
    write_atomic(out, (header + yaml.safe_dump(config, sort_keys=False)).encode())
    written.insert(0, out)
    return written


@app.command("config-example")
def config_example() -> None:
    """Print an annotated agent.yaml to start from."""
    from edgeship.device_agent.config import EXAMPLE

    sys.stdout.write(EXAMPLE)


@app.command("systemd-unit")
def systemd_unit(
    config: str = typer.Option(
        "/etc/edgeship/agent.yaml", "--config", help="Config path the unit passes to the agent."
    ),
    user: str = typer.Option("edgeship", "--user", help="The dedicated, non-root user the agent runs as."),
    python: str = typer.Option(
        "",
        "--python",
        help="The Python that has edgeship installed.",
        show_default="the Python running this command",
    ),
    data_dir: str = typer.Option("/var/lib/edgeship-agent", "--data-dir", help="The agent's data_dir."),
    gpu: bool = typer.Option(False, "--gpu", help="Keep /dev visible (Jetson GPU, TensorRT)."),
) -> None:
    """Print a hardened systemd unit (Type=notify, watchdog, Restart=always) for the agent."""
    from edgeship.device_agent.systemd import unit_file

    sys.stdout.write(unit_file(python=python or sys.executable, config=config, user=user, data_dir=data_dir, gpu=gpu))


__all__ = ["EdgeshipError", "app"]
