"""``edgeship fleet``: set up and run the fleet manager, and operate it over its HTTP API.

``init``, ``serve``, ``maintenance run`` and ``broker-config`` work on this machine (the settings file, the database,
files); every other command talks to a running fleet's API (``--url`` and ``--token``, or
``EDGESHIP_FLEET_URL`` and ``EDGESHIP_FLEET_TOKEN``). An error the fleet reports becomes the same
one-line error and exit code as if it had happened here (a refused package exits 3).
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text

from edgeship.errors import (
    AuthError,
    ConfigError,
    ConflictError,
    EdgeshipError,
    KeyFileError,
    NotFoundError,
    PackageError,
    UsageError,
    VersionRollbackError,
)

app = typer.Typer(no_args_is_help=True)
token_app = typer.Typer(no_args_is_help=True)
enroll_token_app = typer.Typer(no_args_is_help=True)
rollout_app = typer.Typer(no_args_is_help=True)
maintenance_app = typer.Typer(no_args_is_help=True)
app.add_typer(token_app, name="token", help="Create, list and revoke API tokens.")
app.add_typer(enroll_token_app, name="enroll-token", help="Create one-time device enrollment tokens.")
app.add_typer(rollout_app, name="rollout", help="Create, watch, pause, resume, abort and approve rollouts.")
app.add_typer(maintenance_app, name="maintenance", help="Database maintenance: telemetry retention and roll-ups.")

console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOption = typer.Option(..., "--config", "-c", metavar="fleet.yaml", help="The fleet's settings file.")
UrlOption = typer.Option(
    None, "--url", envvar="EDGESHIP_FLEET_URL", metavar="URL", help="The fleet's API, e.g. http://127.0.0.1:8480."
)
TokenOption = typer.Option(
    None, "--token", envvar="EDGESHIP_FLEET_TOKEN", metavar="TOKEN", help="An API token (read or admin)."
)
JsonOption = typer.Option(False, "--json", help="Print JSON.")

_ERROR_KINDS: dict[str, type[EdgeshipError]] = {
    "auth": AuthError,
    "forbidden": AuthError,
    "not_found": NotFoundError,
    "conflict": ConflictError,
    "version": VersionRollbackError,
    "package": PackageError,
    "usage": UsageError,
    "too_large": PackageError,
    "media_type": UsageError,
    "key": KeyFileError,
    "config": ConfigError,
}


# --------------------------------------------------------------------------- HTTP client


class FleetClient:
    """A small client of the fleet API; every failure becomes the matching ``EdgeshipError``."""

    def __init__(self, url: str | None, token: str | None, *, timeout: float = 30.0) -> None:
        import httpx

        if not url:
            raise UsageError("give the fleet's URL with --url or EDGESHIP_FLEET_URL (e.g. http://127.0.0.1:8480)")
        if not token:
            raise UsageError(
                "give an API token with --token or EDGESHIP_FLEET_TOKEN ('edgeship fleet init' printed one)"
            )
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "edgeship-cli"},
            timeout=httpx.Timeout(timeout, read=max(timeout, 600.0)),
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, f"/api/v1{path}", **kwargs)
        except httpx.TransportError as exc:
            raise EdgeshipError(
                f"cannot reach the fleet at {self.url} ({exc or type(exc).__name__}); is 'edgeship fleet serve' running there?"
            ) from None
        return _answer(response)

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body if body is not None else {})

    def close(self) -> None:
        self._http.close()


def _answer(response: Any) -> Any:
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code < 400:
        return data
    message = data.get("error") if isinstance(data, dict) else None
    kind = data.get("kind") if isinstance(data, dict) else None
    if not message:
        message = f"the fleet answered HTTP {response.status_code} {response.reason_phrase}"
    raise _ERROR_KINDS.get(str(kind), EdgeshipError)(message)


def _client(url: str | None, token: str | None) -> FleetClient:
    return FleetClient(url, token)


def _pairs(items: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{what} {item!r}: write key=value")
        out.append((key.strip(), value.strip()))
    return out


def _scalar(text: str) -> Any:
    """A command-line value as JSON would read it: null/none/off, true/false, an int, a float, else the text."""
    lowered = text.lower()
    if lowered in ("null", "none", "off"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _duration(text: str, what: str) -> float:
    from edgeship.fleet.settings import parse_duration

    try:
        return parse_duration(text, what)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    delta = max(time.time() - ts, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{delta / size:.0f}{unit} ago"
    return f"{delta:.0f}s ago"


# --------------------------------------------------------------------------- on this machine


@app.command("init")
def init(config: Path = ConfigOption) -> None:
    """Create or upgrade the database, create the TUF repository and its keys, and print a first admin token
    (only when the fleet has no token yet). Safe to run again: what exists is kept."""
    from edgeship.fleet import auth
    from edgeship.fleet.context import FleetContext
    from edgeship.fleet.db import migrate
    from edgeship.fleet.models import ApiToken
    from edgeship.fleet.settings import load_settings
    from edgeship.fleet.tuf_repo import TufRepository

    settings = load_settings(config)
    ctx = FleetContext.open(settings)
    try:
        ctx.trusted_keys  # noqa: B018 - fail now on an unreadable publisher key, not at the first push
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        revision = migrate(ctx.db)
        console.print(f"database {ctx.db.engine.url.render_as_string(hide_password=True)}: schema {revision}")
        if (settings.tuf_dir / "metadata").is_dir() and any((settings.tuf_dir / "metadata").glob("*.root.json")):
            console.print(f"TUF repository {settings.tuf_dir}: exists, kept")
        else:
            TufRepository.create(settings.tuf_dir, keys_dir=settings.tuf_keys_dir, expiry=settings.tuf.expiry())
            console.print(f"TUF repository {settings.tuf_dir}: created; role keys in {settings.tuf_keys_dir}")
            console.print("  move root.pem (and targets.pem, see docs/fleet.md) offline before production")
        with ctx.db.session(readonly=True) as session:
            has_tokens = session.query(ApiToken.id).first() is not None
        if has_tokens:
            console.print("API tokens exist already; create more with 'edgeship fleet token create'")
            return
        _row, secret = auth.create_token(ctx, "admin", "admin", actor="cli:init")
        console.print("first admin token (shown once; keep it like a password):")
        print(secret)
    finally:
        ctx.close()


@app.command("serve")
def serve(
    config: Path = ConfigOption,
    no_ingest: bool = typer.Option(
        False, "--no-ingest", help="Leave telemetry and events to 'edgeship fleet ingest' processes."
    ),
) -> None:
    """Run the fleet manager in the foreground: the API, the TUF repository, MQTT ingest and the rollout
    scheduler. Any number of these may run against one PostgreSQL database."""
    from edgeship.fleet.settings import load_settings

    settings = load_settings(config)
    # fleet.service wires the API, ingest and the scheduler; imported only here (it pulls uvicorn and MQTT).
    service = importlib.import_module("edgeship.fleet.service")
    service.serve(settings, ingest=not no_ingest)


@app.command("ingest")
def ingest(
    config: Path = ConfigOption,
    name: str = typer.Option(
        None,
        "--name",
        metavar="NAME",
        help="This process's stable name (its MQTT sessions; default <host>-ingest). Give each process its own.",
    ),
    metrics_port: int = typer.Option(
        None, "--metrics-port", metavar="PORT", help="Serve this process's Prometheus /metrics on 127.0.0.1:PORT."
    ),
) -> None:
    """Run only MQTT ingest (telemetry, events, status into the database) in the foreground, as a process of
    its own: start several (each with its own --name) beside 'fleet serve --no-ingest' to spread the load
    over cores or machines; they share the broker's shared subscription."""
    import socket

    from edgeship.device_agent.topics import check_id
    from edgeship.fleet.settings import load_settings

    settings = load_settings(config)
    instance = check_id("--name", name or f"{socket.gethostname()}-ingest")
    service = importlib.import_module("edgeship.fleet.service")
    service.ingest_only(settings, instance, metrics_port)


@maintenance_app.command("run")
def maintenance_run(config: Path = ConfigOption, as_json: bool = JsonOption) -> None:
    """Roll up raw telemetry older than retention.raw per minute and per hour, delete it, and delete roll-ups past
    retention.minute / retention.hour. Safe beside running fleet processes: small batches, one job at a time
    (exits 0 and says so when another process holds the job's lease)."""
    import socket

    from edgeship.fleet.context import FleetContext
    from edgeship.fleet.db import migrate
    from edgeship.fleet.retention import run_maintenance
    from edgeship.fleet.settings import load_settings

    settings = load_settings(config)
    ctx = FleetContext.open(settings)
    try:
        migrate(ctx.db)
        report = run_maintenance(
            ctx.db.session, settings.retention, ctx.now(), owner=f"cli-{socket.gethostname()}-{os.getpid()}"
        )
    finally:
        ctx.close()
    if as_json:
        console.print_json(json.dumps(report.to_json()))
    elif not report.ran:
        console.print("another fleet process is running the maintenance job; nothing done")
    else:
        console.print(
            f"rolled up and deleted {report.raw_deleted} raw telemetry rows in {report.batches} batches; "
            f"deleted {report.minute_deleted} minute and {report.hour_deleted} hour roll-ups past retention"
        )


@app.command("broker-config")
def broker_config(
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Directory to write mosquitto.conf, passwd, acl into."),
    fleet: str = typer.Option(..., "--fleet", metavar="FLEET", help="The fleet id (fleet.yaml's fleet_id)."),
    tls: bool = typer.Option(False, "--tls", help="Add a TLS listener with a development CA (tls/)."),
    mutual_tls: bool = typer.Option(False, "--mutual-tls", help="Require client certificates (CN = username)."),
    fleet_password_file: Path | None = typer.Option(
        None, "--fleet-password-file", metavar="FILE", help="The fleet account's password (default: a new random one)."
    ),
    port: int = typer.Option(1883, "--port", help="Plain listener on 127.0.0.1."),
    tls_port: int = typer.Option(8883, "--tls-port", help="TLS listener (with --tls)."),
    save_every: int = typer.Option(
        1,
        "--save-every",
        min=1,
        metavar="N",
        help="Save the broker's database after every N changes (1: nothing acknowledged is lost on a crash; "
        "a few hundred for thousands of devices, each save rewrites the whole database; docs/broker.md).",
    ),
) -> None:
    """Write a mosquitto configuration for the fleet: accounts, device ACL, unlimited QoS 1 queues (docs/broker.md)."""
    from edgeship.fleet.broker import write_broker_config
    from edgeship.fleet.dev_tls import write_private

    if fleet_password_file is not None:
        try:
            password = fleet_password_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"--fleet-password-file: cannot read {fleet_password_file}: {exc.strerror}") from None
        if not password:
            raise UsageError(f"--fleet-password-file: {fleet_password_file} is empty")
    else:
        password = secrets.token_urlsafe(24)
    if (out / "mosquitto.conf").exists():
        raise UsageError(f"{out / 'mosquitto.conf'} exists; give another --out (accounts would be overwritten)")
    files = write_broker_config(
        out,
        fleet,
        {},
        password,
        tls=tls,
        mutual_tls=mutual_tls,
        port=port,
        tls_port=tls_port,
        autosave_interval=save_every,
    )
    written = [files.conf, files.password_file, files.acl_file]
    if fleet_password_file is None:
        secret_file = out / "fleet-password"
        write_private(secret_file, (password + "\n").encode())
        written.append(secret_file)
    if files.tls is not None:
        written += [files.tls.ca_cert, files.tls.server_cert, files.tls.server_key]
    for path in written:
        console.print(f"wrote {path}")
    console.print(
        f"fleet account {files.fleet_username}; in fleet.yaml set broker.accounts_file: {files.password_file}"
        + (f" and broker.device_ca: {files.tls.ca_cert}" if files.tls is not None else "")
    )


# --------------------------------------------------------------------------- tokens


@token_app.command("create")
def token_create(
    name: str = typer.Option(..., "--name", help="A name for the token (who or what uses it)."),
    role: str = typer.Option("read", "--role", help="read or admin."),
    url: str | None = UrlOption,
    token: str | None = TokenOption,
    config: Path | None = typer.Option(
        None, "--config", "-c", metavar="fleet.yaml", help="Work on the database directly (no running fleet needed)."
    ),
) -> None:
    """Create an API token and print it once."""
    if config is not None:
        from edgeship.fleet import auth
        from edgeship.fleet.context import FleetContext
        from edgeship.fleet.settings import load_settings

        ctx = FleetContext.open(load_settings(config))
        try:
            _row, secret = auth.create_token(ctx, name, role, actor="cli")
        finally:
            ctx.close()
    else:
        secret = _client(url, token).post("/tokens", {"name": name, "role": role})["token"]
    err.print(f"token {name!r} ({role}), shown once:")
    print(secret)


@token_app.command("revoke")
def token_revoke(
    name: str = typer.Argument(..., help="The token's name."),
    url: str | None = UrlOption,
    token: str | None = TokenOption,
) -> None:
    """Revoke an API token; it stops working at once."""
    _client(url, token).request("DELETE", f"/tokens/{name}")
    console.print(f"revoked {name}")


@token_app.command("list")
def token_list(url: str | None = UrlOption, token: str | None = TokenOption, as_json: bool = JsonOption) -> None:
    """List API tokens (names and roles; never the secrets)."""
    items = _client(url, token).get("/tokens")["items"]
    if as_json:
        print(json.dumps(items, indent=2))
        return
    table = Table("name", "role", "created", "revoked")
    for item in items:
        table.add_row(
            item["name"], item["role"], _ago(item["created_at"]), _ago(item["revoked_at"]) if item["revoked_at"] else ""
        )
    console.print(table)


@enroll_token_app.command("create")
def enroll_token_create(
    tag: list[str] = typer.Option([], "--tag", metavar="KEY=VALUE", help="A tag enrolled devices get; repeatable."),
    target: str | None = typer.Option(None, "--target", help="The only target a device may enroll as."),
    expires: str = typer.Option("24h", "--expires", help="Lifetime: 30m, 24h, 7d."),
    url: str | None = UrlOption,
    token: str | None = TokenOption,
) -> None:
    """Create a one-time enrollment token; give it to one device ('edgeship agent enroll --token ...')."""
    body = {"tags": dict(_pairs(tag, "--tag")), "target": target, "expires_s": _duration(expires, "--expires")}
    answer = _client(url, token).post("/enrollment-tokens", body)
    err.print(
        f"enrollment token {answer['id']} (one device, expires in {expires}"
        + (f", target {target}" if target else "")
        + (f", tags {answer['tags']}" if answer["tags"] else "")
        + "):"
    )
    print(answer["token"])


# --------------------------------------------------------------------------- packages


@app.command("push")
def push(
    files: list[Path] = typer.Argument(..., metavar="PACKAGE...", help="Signed .edgepkg files."),
    url: str | None = UrlOption,
    token: str | None = TokenOption,
) -> None:
    """Upload packages; the fleet verifies each (signature, schema, hashes, target, version) before listing it.
    A refused package is one error line; the others are still pushed. Exits 3 when one was refused."""
    client = _client(url, token)
    refused: list[EdgeshipError] = []
    for path in files:
        if not path.is_file():
            refused.append(UsageError(f"{path} does not exist"))
            err.print(f"[bold red]error:[/] {path} does not exist")
            continue
        try:
            row = _upload(client, path)
        except EdgeshipError as exc:
            refused.append(exc)
            err.print(f"[bold red]error:[/] {exc}")
            continue
        console.print(
            f"pushed {row['name']} v{row['version']} for {row['target']}/{row['precision']} "
            f"(package {row['id']}, {row['size']} bytes) -> {row['target_path']}"
        )
    if refused:
        raise typer.Exit(max(e.exit_code for e in refused))


def _upload(client: FleetClient, path: Path) -> Any:
    size = path.stat().st_size
    progress = Progress(
        TextColumn(path.name),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    task = progress.add_task(path.name, total=size)

    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                progress.advance(task, len(chunk))
                yield chunk

    with progress:
        return client.request(
            "POST",
            "/packages",
            params={"filename": path.name},
            content=chunks(),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )


# --------------------------------------------------------------------------- devices


@app.command("devices")
def devices(
    tag: list[str] = typer.Option([], "--tag", metavar="KEY=VALUE", help="Only devices with this tag; repeatable."),
    target: str | None = typer.Option(None, "--target", help="Only devices of this target."),
    online: bool | None = typer.Option(None, "--online/--offline", help="Only online (or offline) devices."),
    version: int | None = typer.Option(None, "--version", help="Only devices running this model version."),
    limit: int = typer.Option(100, "--limit", help="At most this many (1-1000)."),
    offset: int = typer.Option(0, "--offset", help="Skip this many."),
    url: str | None = UrlOption,
    token: str | None = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """List enrolled devices: target, online, model and version, OTA state, last seen, tags."""
    _pairs(tag, "--tag")
    params: dict[str, Any] = {
        "tag": tag or None,
        "target": target,
        "online": None if online is None else str(online).lower(),
        "version": version,
        "limit": limit,
        "offset": offset,
    }
    answer = _client(url, token).get("/devices", **params)
    if as_json:
        print(json.dumps(answer, indent=2))
        return
    table = Table("device", "target", "online", "model", "ota", "last seen", "tags")
    for d in answer["items"]:
        model = d["model"]
        table.add_row(
            d["id"],
            d["target"],
            "yes" if d["online"] else "no",
            f"{model['name']} v{model['version']} ({model['slot']})" if model else "-",
            d["ota"]["state"] or "",
            _ago(d["last_seen"]),
            " ".join(f"{k}={v}" for k, v in sorted(d["tags"].items())),
        )
    console.print(table)
    shown = len(answer["items"])
    console.print(f"{shown} of {answer['total']} device(s)" + (f" from {offset}" if offset else ""))


@app.command("import-devices")
def import_devices(
    csv_file: Path = typer.Argument(..., metavar="devices.csv", help="device_id,target[,tags] (tags: k=v;k2=v2)."),
    out: Path = typer.Option(..., "--out", help="Where to write the devices' credentials (JSON lines, mode 0600)."),
    config: Path = ConfigOption,
) -> None:
    """Enroll many devices at once from a CSV file: one transaction, one password-file write, one broker reload.

    Runs on the broker's host (it edits broker.accounts_file). Each device gets its own broker account
    (the ACL lets it reach only its own topics); the credentials file holds each device's agent bundle
    (broker password in clear): hand each line to its device, then delete the file.
    """
    from edgeship.fleet.context import FleetContext
    from edgeship.fleet.dev_tls import write_private
    from edgeship.fleet.enrollment import enroll_many, read_device_csv
    from edgeship.fleet.settings import load_settings

    if out.exists():
        raise UsageError(f"{out} exists; choose another --out (it would hold new passwords)")
    rows = read_device_csv(csv_file)
    ctx = FleetContext.open(load_settings(config))
    try:
        started = time.monotonic()
        bundles = enroll_many(ctx, rows, actor="cli")
        elapsed = time.monotonic() - started
    finally:
        ctx.close()
    write_private(out, "".join(json.dumps(b.to_json()) + "\n" for b in bundles).encode())
    err.print(f"enrolled {len(bundles)} device(s) in {elapsed:.1f} s; credentials in {out} (delete it once handed out)")


# --------------------------------------------------------------------------- rollouts


@rollout_app.command("create")
def rollout_create(
    package: str = typer.Option(..., "--package", metavar="NAME:VERSION@TARGET[/PRECISION]", help="The package."),
    waves: str = typer.Option("100%", "--waves", help="Cumulative waves: 1%,10%,50%,100% or device counts 2,10,50."),
    soak: str = typer.Option("0", "--soak", help="Minimum soak per wave before it is judged: 10m, 1h."),
    max_per_minute: int | None = typer.Option(None, "--max-per-minute", help="Command at most N devices a minute."),
    device_timeout: str = typer.Option(
        "15m", "--device-timeout", help="A device that has not finished by then is timed out."
    ),
    tag: list[str] = typer.Option(
        [], "--tag", metavar="KEY=VALUE", help="Select by tag; repeat a key for alternatives."
    ),
    gate: list[str] = typer.Option(
        [], "--gate", metavar="NAME=VALUE", help="A gate threshold, e.g. max_install_failure_rate=0.1 (off: =off)."
    ),
    approval: bool = typer.Option(False, "--approval", help="Wait for 'rollout approve' before each next wave."),
    validation: list[str] = typer.Option(
        [], "--validation", metavar="KEY=VALUE", help="Deploy validation, e.g. runs=20."
    ),
    health: list[str] = typer.Option(
        [], "--health", metavar="KEY=VALUE", help="Deploy health window, e.g. window_s=30."
    ),
    shadow: list[str] = typer.Option([], "--shadow", metavar="KEY=VALUE", help="Shadow mode, e.g. fraction=0.5."),
    name: str | None = typer.Option(None, "--name", help="A name for the rollout."),
    url: str | None = UrlOption,
    token: str | None = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Create a rollout of a pushed package to the devices its tags and target select, in waves with gates."""
    selector: dict[str, Any] = {}
    for key, value in _pairs(tag, "--tag"):
        if key in selector:
            previous = selector[key]
            selector[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            selector[key] = value
    wave_items: list[str | int] = [int(w) if w.strip().isdigit() else w.strip() for w in waves.split(",") if w.strip()]
    deploy: dict[str, Any] = {}
    for section, items in (("validation", validation), ("health", health), ("shadow", shadow)):
        if items:
            deploy[section] = {k: _scalar(v) for k, v in _pairs(items, f"--{section}")}
    body: dict[str, Any] = {
        "package": package,
        "waves": wave_items,
        "soak_s": _duration(soak, "--soak"),
        "device_timeout_s": _duration(device_timeout, "--device-timeout"),
        "tags": selector,
        "gates": {k: _scalar(v) for k, v in _pairs(gate, "--gate")},
        "deploy": deploy,
        "require_approval": approval,
    }
    if max_per_minute is not None:
        body["max_per_minute"] = max_per_minute
    if name is not None:
        body["name"] = name
    answer = _client(url, token).post("/rollouts", body)
    if as_json:
        print(json.dumps(answer, indent=2))
        return
    per_wave = ", ".join(str(w["devices"]) for w in answer["waves"])
    console.print(
        f"rollout {answer['id']} created ({answer['state']}): {answer['name']} to {answer['devices']} device(s), "
        f"per wave {per_wave}"
    )


def render_status(status: dict[str, Any]) -> Group:
    """A rollout's status as rich renderables: the header, a table of waves, the gates, the halt reason."""
    order = [
        "pending",
        "commanded",
        "COMMITTED",
        "FAILED",
        "ROLLED_BACK",
        "timed_out",
        "reverting",
        "reverted",
        "revert_failed",
        "skipped",
    ]
    seen = {s for w in status["waves"] for s in w["states"]}
    columns = [s for s in order if s in seen] + sorted(seen - set(order))
    package = status.get("package") or {}
    header = Text(
        f"rollout {status['id']} {status['name']}: {status['state']}"
        + (f", wave {status['current_wave'] + 1}/{len(status['waves'])}" if status["waves"] else "")
        + (f" | {package.get('name')} v{package.get('version')} for {package.get('target')}" if package else "")
    )
    table = Table("wave", "reach", "devices", *columns, "done")
    for wave in status["waves"]:
        done = sum(n for s, n in wave["states"].items() if s not in ("pending", "commanded", "reverting"))
        marker = ">" if wave["index"] == status["current_wave"] and not status["ended"] else " "
        table.add_row(
            f"{marker}{wave['index'] + 1}",
            str(wave["reach"]),
            str(wave["devices"]),
            *(str(wave["states"].get(c, "")) for c in columns),
            f"{done}/{wave['devices']}",
        )
    lines: list[Any] = [header, table]
    gates = status.get("gates") or {}
    values = status.get("gate_values") or {}
    thresholds = {
        "install_failure_rate": ("max", gates.get("max_install_failure_rate")),
        "rollback_rate": ("max", gates.get("max_rollback_rate")),
        "error_rate_increase": ("max", gates.get("max_error_rate")),
        "latency_p99_ratio": ("max", gates.get("max_latency_p99_ratio")),
        "drift_psi": ("max", gates.get("max_drift_psi")),
        "shadow_agreement": ("min", gates.get("min_shadow_agreement")),
    }
    # gate_values: per judged wave (index as a string), the values its gates were judged on.
    per_wave = {k: v for k, v in values.items() if isinstance(v, dict)} or ({"": values} if values else {"": {}})
    for wave_key in sorted(per_wave, key=lambda k: int(k) if k.isdigit() else -1):
        judged = per_wave[wave_key]
        parts = []
        for gate_name, (kind, limit) in thresholds.items():
            value = judged.get(gate_name)
            if value is None and limit is None:
                continue
            shown = "-" if value is None else f"{value:.3g}"
            parts.append(f"{gate_name} {shown}" + (f" ({kind} {limit:g})" if limit is not None else ""))
        if parts:
            label = f"gates, wave {int(wave_key) + 1}: " if wave_key.isdigit() else "gates: "
            lines.append(Text(label + ", ".join(parts)))
    if status.get("halt_reason"):
        lines.append(Text(f"halt reason: {status['halt_reason']}", style="bold red"))
    return Group(*lines)


@rollout_app.command("status")
def rollout_status(
    rollout_id: int = typer.Argument(..., metavar="ID"),
    watch: bool = typer.Option(False, "--watch", "-w", help="Redraw until the rollout ends."),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between redraws with --watch."),
    url: str | None = UrlOption,
    token: str | None = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Progress per wave (device counts by state), gate values and the halt reason."""
    client = _client(url, token)
    status = client.get(f"/rollouts/{rollout_id}")
    if as_json:
        print(json.dumps(status, indent=2))
        return
    if not watch:
        console.print(render_status(status))
        return
    with Live(render_status(status), console=console, auto_refresh=False, transient=False) as live:
        while not status["ended"]:
            time.sleep(max(interval, 0.1))
            status = client.get(f"/rollouts/{rollout_id}")
            live.update(render_status(status), refresh=True)
    console.print(f"rollout {rollout_id} ended: {status['state']}")


@rollout_app.command("list")
def rollout_list(
    state: str | None = typer.Option(None, "--state", help="Only rollouts in this state."),
    url: str | None = UrlOption,
    token: str | None = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """List rollouts, newest first."""
    answer = _client(url, token).get("/rollouts", state=state)
    if as_json:
        print(json.dumps(answer, indent=2))
        return
    table = Table("id", "name", "state", "wave", "created", "by")
    for r in answer["items"]:
        table.add_row(
            str(r["id"]),
            r["name"],
            r["state"],
            f"{r['current_wave'] + 1}/{len(r['wave_specs'])}",
            _ago(r["created_at"]),
            r["created_by"],
        )
    console.print(table)


def _operate(operation: str, rollout_id: int, url: str | None, token: str | None, body: Any = None) -> None:
    status = _client(url, token).post(f"/rollouts/{rollout_id}/{operation}", body)
    console.print(f"rollout {rollout_id}: {status['state']}")


@rollout_app.command("pause")
def rollout_pause(
    rollout_id: int = typer.Argument(..., metavar="ID"), url: str | None = UrlOption, token: str | None = TokenOption
) -> None:
    """Stop commanding devices; devices already commanded finish."""
    _operate("pause", rollout_id, url, token)


@rollout_app.command("resume")
def rollout_resume(
    rollout_id: int = typer.Argument(..., metavar="ID"), url: str | None = UrlOption, token: str | None = TokenOption
) -> None:
    """Resume a paused rollout."""
    _operate("resume", rollout_id, url, token)


@rollout_app.command("abort")
def rollout_abort(
    rollout_id: int = typer.Argument(..., metavar="ID"),
    reason: str | None = typer.Option(None, "--reason", help="Why (kept in the audit log)."),
    url: str | None = UrlOption,
    token: str | None = TokenOption,
) -> None:
    """End a rollout that has not ended; devices keep what they run."""
    _operate("abort", rollout_id, url, token, {"reason": reason} if reason else None)


@rollout_app.command("approve")
def rollout_approve(
    rollout_id: int = typer.Argument(..., metavar="ID"), url: str | None = UrlOption, token: str | None = TokenOption
) -> None:
    """Let a rollout waiting for approval start its next wave."""
    _operate("approve", rollout_id, url, token)


# --------------------------------------------------------------------------- audit


@app.command("audit")
def audit_log(
    limit: int = typer.Option(50, "--limit", help="At most this many entries (1-1000)."),
    actor: str | None = typer.Option(None, "--actor", help="Only entries by this actor (token:NAME)."),
    action: str | None = typer.Option(None, "--action", help="Only this action (package.push, rollout.pause, ...)."),
    url: str | None = UrlOption,
    token: str | None = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Show the audit log, newest first: who did what, when."""
    items = _client(url, token).get("/audit", limit=limit, actor=actor, action=action)["items"]
    if as_json:
        print(json.dumps(items, indent=2))
        return
    table = Table("id", "when", "actor", "action", "subject", "details")
    for item in items:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(item["at"]))
        table.add_row(
            str(item["id"]),
            when,
            item["actor"],
            item["action"],
            item["subject"],
            json.dumps(item["details"], separators=(",", ":"))[:80],
        )
    console.print(table)


__all__ = ["FleetClient", "app", "render_status"]
