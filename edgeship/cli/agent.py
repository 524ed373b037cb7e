"""``edgeship agent``: run the device agent, install a package locally, show its state."""

from __future__ import annotations

import json
import logging
import sys
import urllib.error
import urllib.request
from pathlib import Path

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
    python: str = typer.Option(sys.executable, "--python", help="The Python that has edgeship installed."),
    data_dir: str = typer.Option("/var/lib/edgeship-agent", "--data-dir", help="The agent's data_dir."),
    gpu: bool = typer.Option(False, "--gpu", help="Keep /dev visible (Jetson GPU, TensorRT)."),
) -> None:
    """Print a hardened systemd unit (Type=notify, watchdog, Restart=always) for the agent."""
    from edgeship.device_agent.systemd import unit_file

    sys.stdout.write(unit_file(python=python, config=config, user=user, data_dir=data_dir, gpu=gpu))


__all__ = ["EdgeshipError", "app"]
