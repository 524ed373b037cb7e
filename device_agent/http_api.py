"""The local inference endpoint (stdlib HTTP server on 127.0.0.1), see docs/agent.md.

Routes:

* ``POST /v1/infer``: JSON (``{"inputs": {"name": [[...]]}}``, or ``{"inputs": [[...]]}`` for a
  one-input model) for small tensors; ``application/x-npy`` (one input) or
  ``application/x-npz`` (inputs by name) bodies for large ones. The answer has the request's
  format unless ``Accept`` asks for another (``application/json``, ``application/x-npz``,
  ``application/x-npy`` for a one-output model). Every answer names the model that
  computed it in ``X-Edgeship-Model: name/version/slot``.
* ``GET /v1/health``: 200 with the serving model, 503 when the device has none.
* ``GET /v1/model``: the model's name, version, slot, inputs and outputs.
* ``GET /v1/stats``: the model's statistics (latency, requests, errors, drift), the OTA state.
* ``POST /v1/admin/install``: ``{"path": "/media/usb/model.edgepkg"}``, with
  ``Authorization: Bearer <data_dir/admin.token>``: apply a local package (``edgeship agent install``
  uses it when an agent runs).

Errors are JSON ``{"error": "...", "code": "..."}`` with 400 (bad input), 404, 405, 411, 413
(body over ``serve.max_body_mib``), 503 (no model) or 500 (the model failed).
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import threading
import zipfile
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeship.device_agent.serving import NoModelError
from edgeship.errors import EdgeshipError, InputError, UsageError

if TYPE_CHECKING:
    from edgeship.device_agent.daemon import Agent

log = logging.getLogger("edgeship.device_agent.http")

NPY = "application/x-npy"
NPZ = "application/x-npz"
JSON = "application/json"


class InferenceServer(ThreadingHTTPServer):
    """The HTTP server; one thread per connection (keep-alive), daemon threads."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self, agent: Agent, host: str, port: int, max_body: int, admin_token: Callable[[], str | None]
    ) -> None:
        self.agent = agent
        self.max_body = max_body
        self.admin_token = admin_token
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> threading.Thread:
        thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.2}, name="edgeship-http", daemon=True
        )
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    server: InferenceServer
    protocol_version = "HTTP/1.1"
    server_version = "edgeship-agent"
    # TCP_NODELAY: an answer goes out as two writes (headers, then body); with Nagle on, the body
    # waits for the client's delayed ACK. On a keep-alive connection busier than ~25 requests/s
    # every answer then took 44 ms instead of 1 ms (benchmarks/agent_switch.py, 2026-12-06).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # ----------------------------------------------------------------- routing

    def do_GET(self) -> None:
        agent = self.server.agent
        path = self.path.split("?", 1)[0]
        if path == "/v1/health":
            model = agent.holder.current
            body = {
                "status": "ok" if model else "no_model",
                "model": model.model_ref() if model else None,
                "ota": agent.ota_state,
            }
            self._json(HTTPStatus.OK if model else HTTPStatus.SERVICE_UNAVAILABLE, body)
        elif path == "/v1/model":
            model = agent.holder.current
            if model is None:
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, "no_model", "no model is installed on this device yet")
                return
            s = model.session
            self._json(
                HTTPStatus.OK,
                {
                    **model.model_ref(),
                    "backend": s.backend_name,
                    "signed_by": s.signed_by,
                    "inputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype.name} for t in s.inputs],
                    "outputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype.name} for t in s.outputs],
                },
            )
        elif path == "/v1/stats":
            self._json(HTTPStatus.OK, agent.stats())
        else:
            self._error(
                HTTPStatus.NOT_FOUND,
                "not_found",
                f"no route {path}; see GET /v1/health, /v1/model, /v1/stats, POST /v1/infer",
            )

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/v1/infer":
            self._infer()
        elif path == "/v1/admin/install":
            self._install()
        else:
            self._error(HTTPStatus.NOT_FOUND, "not_found", f"no route {path}")

    # ----------------------------------------------------------------- inference

    def _body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None:
            self._error(HTTPStatus.LENGTH_REQUIRED, "length_required", "send a Content-Length header")
            return None
        try:
            size = int(length)
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, "bad_request", "Content-Length is not a number")
            return None
        if size > self.server.max_body:
            self.close_connection = True
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "too_large",
                f"body is {size} bytes, over the {self.server.max_body}-byte limit (serve.max_body_mib)",
            )
            return None
        return self.rfile.read(size)

    def _infer(self) -> None:
        body = self._body()
        if body is None:
            return
        ctype = (self.headers.get("Content-Type") or JSON).split(";", 1)[0].strip().lower()
        agent = self.server.agent
        try:
            inputs = _decode_inputs(body, ctype, agent)
            outputs, model = agent.holder.infer(inputs)
        except NoModelError as exc:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "no_model", str(exc))
            return
        except (InputError, UsageError) as exc:
            self._error(HTTPStatus.BAD_REQUEST, "bad_input", str(exc))
            return
        except EdgeshipError as exc:
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "model_failed", str(exc))
            return
        except Exception as exc:  # a native library's own error type: the model failed on this input
            log.warning("inference failed: %s", exc)
            self._error(
                HTTPStatus.INTERNAL_SERVER_ERROR, "model_failed", f"the model failed: {type(exc).__name__}: {exc}"
            )
            return
        ref = model.record
        headers = {"X-Edgeship-Model": f"{ref.name}/{ref.version}/{model.slot}"}
        accept = (self.headers.get("Accept") or "").split(",", 1)[0].split(";", 1)[0].strip().lower()
        wanted = accept if accept in (JSON, NPY, NPZ) else (ctype if ctype in (NPY, NPZ) else JSON)
        if wanted == NPY and len(outputs) == 1:
            buf = io.BytesIO()
            np.save(buf, next(iter(outputs.values())), allow_pickle=False)
            self._send(HTTPStatus.OK, buf.getvalue(), NPY, headers)
        elif wanted in (NPY, NPZ):
            buf = io.BytesIO()
            np.savez(buf, **outputs)  # type: ignore[arg-type]
            self._send(HTTPStatus.OK, buf.getvalue(), NPZ, headers)
        else:
            body_out = {
                "model": {"name": ref.name, "version": ref.version, "slot": model.slot},
                "outputs": {k: v.tolist() for k, v in outputs.items()},
            }
            self._json(HTTPStatus.OK, body_out, headers)

    def _install(self) -> None:
        token = self.server.admin_token()
        given = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if not token or not hmac.compare_digest(given.encode(), token.encode()):
            self._error(HTTPStatus.UNAUTHORIZED, "unauthorized", "send Authorization: Bearer <the agent's admin.token>")
            return
        body = self._body()
        if body is None:
            return
        try:
            request = json.loads(body)
            path = request["path"]
            if not isinstance(path, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            self._error(HTTPStatus.BAD_REQUEST, "bad_request", 'send {"path": "/path/to/package.edgepkg"}')
            return
        window = request.get("health_window_s", 0.0)
        if not isinstance(window, (int, float)) or window < 0:
            self._error(HTTPStatus.BAD_REQUEST, "bad_request", "health_window_s must be a number of seconds >= 0")
            return
        try:
            outcome = self.server.agent.install_local(path, health_window_s=float(window))
        except EdgeshipError as exc:
            self._error(HTTPStatus.CONFLICT, "install_refused", str(exc))
            return
        self._json(HTTPStatus.OK, outcome)

    # ----------------------------------------------------------------- responses

    def _json(self, status: HTTPStatus, body: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(body, allow_nan=False, default=_jsonable).encode(), JSON, headers)

    def _error(self, status: HTTPStatus, code: str, message: str) -> None:
        self._json(status, {"error": message, "code": code})

    def _send(self, status: HTTPStatus, data: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float):
        return None
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _decode_inputs(body: bytes, ctype: str, agent: Agent) -> Any:
    """Turn a request body into what ``Session.run`` takes; raises ``InputError`` saying what is wrong."""
    if ctype == NPY or body[:6] == b"\x93NUMPY":
        try:
            return np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"body is not a valid .npy array ({exc})") from None
    if ctype == NPZ or body[:2] == b"PK":
        try:
            with np.load(io.BytesIO(body), allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise InputError(f"body is not a valid .npz archive ({exc})") from None
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"body is not JSON ({exc}); send JSON, .npy or .npz") from None
    if not isinstance(request, dict) or "inputs" not in request:
        raise InputError('JSON body must be {"inputs": {name: nested list}} or {"inputs": nested list}')
    model = agent.holder.current
    if model is None:
        raise NoModelError("no model is installed on this device yet")
    dtypes = {t.name: t.dtype for t in model.session.inputs}
    raw = request["inputs"]
    if isinstance(raw, dict):
        out = {}
        for name, value in raw.items():
            dtype = dtypes.get(name)
            out[name] = _array(name, value, dtype)
        return out
    if len(dtypes) != 1:
        raise InputError(f"this model has {len(dtypes)} inputs ({', '.join(dtypes)}); send them by name")
    return _array(next(iter(dtypes)), raw, next(iter(dtypes.values())))


def _array(name: str, value: Any, dtype: np.dtype[Any] | None) -> Any:
    try:
        return np.asarray(value, dtype=dtype)
    except (ValueError, TypeError) as exc:
        raise InputError(f"input {name!r} is not a rectangular array of numbers ({exc})") from None
