"""``edgeship fleet serve``: the API, the scheduler, the ingest and the TUF refresher in one process.

Stateless beside its database and broker: any number of these processes may run against one
PostgreSQL and one broker. Each has its own MQTT clients (commands out; telemetry, events and
status in through the shared subscription), leases the rollouts it advances (``fleet.scheduler``),
and keeps the TUF timestamp fresh (whichever process gets there first re-signs it; the
repository's file lock serializes them). A maintenance thread opens and resolves alerts every
``alerts.interval_s`` (telling ``alerts.webhook_url``, if set, from another thread) and runs the
retention job every ``retention.interval`` (one process at a time, under a lease).

MQTT client ids are stable per process (``<fleet>-<role>-<instance>``, the instance defaulting to
the host name and HTTP port), with persistent sessions: messages that arrive while a crashed fleet process
restarts wait in the broker for it (``ingest.session_expiry``, 1 h by default). A clean stop ends
the session, so the broker stops handing that process a share of the devices' messages.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeship.device_agent.topics import device_topic
from edgeship.fleet import alerts, retention
from edgeship.fleet.context import FleetContext
from edgeship.fleet.db import migrate
from edgeship.fleet.ingest import Counters, Ingest, Writer
from edgeship.fleet.metrics import ProcessStats
from edgeship.fleet.scheduler import Command, Scheduler, deploy_message
from edgeship.fleet.settings import FleetSettings

log = logging.getLogger("edgeship.fleet")


def mqtt_client(
    settings: FleetSettings, client_id: str, *, persistent: bool = True, manual_ack: bool = False
) -> mqtt.Client:
    """A paho MQTT 5 client for the fleet's own account, connected asynchronously (it reconnects by itself);
    with ``manual_ack`` a QoS 1 message is acknowledged only when the caller calls ``client.ack``."""
    broker = settings.broker
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    username = settings.broker_username if broker.username is None else broker.username
    secret = broker.secret()
    if secret is not None:
        client.username_pw_set(username, secret)
    url = urlparse(broker.url)
    if url.scheme == "mqtts":
        client.tls_set(ca_certs=str(broker.ca_file) if broker.ca_file else None)
    client.reconnect_delay_set(1, 10)
    client.max_queued_messages_set(0)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = int(settings.ingest.session_expiry) if persistent else 0
    port = url.port or (8883 if url.scheme == "mqtts" else 1883)
    client.connect_async(
        url.hostname or "127.0.0.1", port, keepalive=broker.keepalive_s, clean_start=not persistent, properties=props
    )
    return client


class Commander:
    """Publishes deploy commands (QoS 1, MQTT 5 message expiry), in the order the scheduler decided them."""

    def __init__(self, settings: FleetSettings, client_id: str) -> None:
        self.fleet = settings.fleet_id
        self.client = mqtt_client(settings, client_id, persistent=False)
        self.client.loop_start()
        self.sent = 0

    def __call__(self, commands: Sequence[Command]) -> None:
        now = time.time()
        for command in commands:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = command.expiry_s
            # Not connected: paho keeps it and sends it on reconnect; lost with this process, the
            # scheduler sends it again (same deployment id) when nobody answered.
            self.client.publish(
                device_topic(self.fleet, command.device_id, "cmd"),
                deploy_message(command, now),
                qos=1,
                properties=props,
            )
            self.sent += 1

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class FleetService:
    """Everything but the HTTP server, which ``serve`` runs in the foreground (tests start this directly)."""

    def __init__(self, settings: FleetSettings, *, instance: str | None = None) -> None:
        self.settings = settings
        self.instance = instance or f"{socket.gethostname()}-{settings.http.port}"
        self.ctx = FleetContext.open(settings)
        self.counters = Counters()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.commander: Commander | None = None
        self.ingest: list[Ingest] = []
        self.scheduler: Scheduler | None = None
        self.notifier: alerts.Notifier | None = None
        if settings.alerts.webhook_url:
            self.notifier = alerts.Notifier(
                settings.alerts.webhook_url,
                fleet_id=settings.fleet_id,
                timeout_s=settings.alerts.webhook_timeout_s,
                retries=settings.alerts.webhook_retries,
            )
        self.maintenance_errors = 0

    @property
    def stats(self) -> ProcessStats:
        """This process's own numbers for ``/metrics``."""
        notifier = self.notifier
        return ProcessStats(
            instance=self.instance,
            ingest_counts=self.counters.snapshot,
            ingest_lag=lambda: max((i.lag_s for i in self.ingest), default=None),
            webhook_counts=notifier.snapshot if notifier is not None else dict,
        )

    def start(self, *, ingest: bool = True, control: bool = True) -> None:
        """Start the parts of the fleet this process runs: ``ingest`` (MQTT in, database rows) and ``control``
        (scheduler, commands out, TUF refresh, alerts, retention). ``fleet serve`` runs both (or only control
        with ``--no-ingest``), ``fleet ingest`` only ingest, so telemetry can scale over processes apart."""
        settings = self.settings
        migrate(self.ctx.db)
        fleet = settings.fleet_id
        if ingest:
            for i in range(max(1, settings.ingest.workers)):
                writer = Writer(self.ctx.db.engine, self.ctx.db.session, fleet, self.counters)
                worker = Ingest(
                    writer,
                    self._ingest_client(f"{fleet}-ingest-{self.instance}-{i}"),
                    group=settings.ingest.share_group,
                    fleet=fleet,
                )
                worker.start()
                self.ingest.append(worker)
        if not control:
            log.info("fleet %s ingest %s started (%d workers)", fleet, self.instance, len(self.ingest))
            return
        self.commander = Commander(settings, f"{fleet}-cmd-{self.instance}")
        self.scheduler = Scheduler(
            self.ctx.db.session,
            self.commander,
            repo=self.ctx.tuf,
            owner=self.instance,
            lease_s=settings.scheduler.lease_s,
            resend_after_s=settings.scheduler.resend_after_s,
        )
        self._spawn(self._schedule, "edgeship-scheduler")
        self._spawn(self._refresh_tuf, "edgeship-tuf-refresh")
        self._spawn(self._watch_alerts, "edgeship-alerts")
        self._spawn(self._retain, "edgeship-retention")
        log.info("fleet %s service %s started", fleet, self.instance)

    def _ingest_client(self, client_id: str) -> Callable[[Callable[[Any, Any, Any], None], list[tuple[str, int]]], Any]:
        def connect(on_message: Callable[[Any, Any, Any], None], filters: list[tuple[str, int]]) -> Any:
            client = mqtt_client(self.settings, client_id, manual_ack=True)
            client.on_message = on_message
            client.on_connect = lambda c, u, f, rc, p: c.subscribe(filters) if not rc.is_failure else None
            client.loop_start()
            return client

        return connect

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _schedule(self) -> None:
        assert self.scheduler is not None
        while not self._stop.wait(self.settings.scheduler.tick_s):
            try:
                self.scheduler.tick()
            except Exception as exc:  # the database restarting, a lost connection: the next tick retries
                log.warning("scheduler tick failed (%s: %s); retrying", type(exc).__name__, exc)

    def _refresh_tuf(self) -> None:
        from datetime import timedelta

        within = timedelta(seconds=self.settings.tuf.refresh_within)
        while not self._stop.wait(min(60.0, self.settings.tuf.refresh_within / 4)):
            try:
                if self.ctx.tuf.refresh_timestamp(within=within):
                    log.info("TUF timestamp refreshed")
            except Exception as exc:  # a missing online key is reported, not fatal
                log.warning("TUF refresh failed: %s", exc)

    def check_alerts(self) -> list[alerts.Change]:
        """Open and resolve alerts now and hand the changes to the webhook (the maintenance thread calls it)."""
        changes = alerts.evaluate(self.ctx.db.session, self.settings.alerts, self.ctx.now())
        for change in changes:
            log.info("alert %s: %s", change.event, change.alert["message"])
        if changes and self.notifier is not None:
            self.notifier.send(changes)
        return changes

    def _watch_alerts(self) -> None:
        while not self._stop.wait(self.settings.alerts.interval_s):
            try:
                self.check_alerts()
            except Exception as exc:  # the database restarting: the next round retries
                self.maintenance_errors += 1
                log.warning("alert check failed (%s: %s); retrying", type(exc).__name__, exc)

    def _retain(self) -> None:
        # Its own thread, so a long first run after an outage never delays alerts; a lease makes it one process.
        wait = min(60.0, self.settings.retention.interval)
        while not self._stop.wait(wait):
            wait = self.settings.retention.interval
            try:
                retention.run_maintenance(
                    self.ctx.db.session,
                    self.settings.retention,
                    self.ctx.now(),
                    owner=self.instance,
                    max_batches=200,
                )
            except Exception as exc:
                self.maintenance_errors += 1
                log.warning("retention job failed (%s: %s); it runs again later", type(exc).__name__, exc)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        for ingest in self.ingest:
            ingest.stop()
        if self.commander is not None:
            self.commander.stop()
        if self.notifier is not None:
            self.notifier.stop()
        if self.scheduler is not None:
            try:
                self.scheduler.release()
            except Exception as exc:
                log.warning("could not release rollout leases: %s", exc)
        self.ctx.close()


def serve(settings: FleetSettings, *, ingest: bool = True) -> None:
    """Run the fleet in the foreground until SIGTERM/SIGINT (``edgeship fleet serve``)."""
    import uvicorn

    from edgeship.fleet.api import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = FleetService(settings)
    service.start(ingest=ingest)
    app = create_app(service.ctx, stats=service.stats)
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.http.host, port=settings.http.port, log_level="warning", lifespan="off")
    )
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run()
    finally:
        service.stop()


def ingest_only(settings: FleetSettings, name: str, metrics_port: int | None = None) -> None:
    """Run only the ingest workers in the foreground until SIGTERM/SIGINT (``edgeship fleet ingest``).

    ``name`` is this process's stable instance name: its MQTT sessions are ``<fleet>-ingest-<name>-<i>``, so a
    process restarted under the same name gets what the broker kept for it (``ingest.session_expiry``).
    ``metrics_port``: serve ``/metrics`` on 127.0.0.1 (this process's ingest series, ``instance=name``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    service = FleetService(settings, instance=name)
    service.start(control=False)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        from edgeship.fleet.metrics import registry_for

        start_http_server(metrics_port, addr="127.0.0.1", registry=registry_for(service.ctx, service.stats))
    try:
        while not stop.wait(60.0):
            counts = service.counters.snapshot()
            lag = max((i.lag_s for i in service.ingest), default=0.0)
            log.info("ingest %s: %s; lag %.1f s", name, counts, lag)
    finally:
        service.stop()
