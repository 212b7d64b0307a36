"""What the HTTP service checks and answers, without BentoML: settings, the request schema, the
answer, and the ASGI guard (token, body size). ``service.py`` wires these into BentoML.

The request schema is built from the model's own :class:`~.features.FeatureSpec`: one field per
feature, typed by its kind (numbers, true/false, category labels as text), unknown fields and
non-finite numbers refused. ``null`` is accepted only for a model trained with
``data.missing: impute`` (it learned fill values); any other model would refuse the gap anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, create_model

from ..core.features import BOOLEAN, CATEGORICAL, IMPUTE, FeatureSpec, category_label
from .predlog import PREDICTION_LOG_DIR, PREDICTION_LOG_ENV

# Routes that answer without the token: probes and Prometheus must work without secrets.
OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})
REQUEST_ID = "x-request-id"
OFF = ("off", "0", "false", "no")

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _int_env(environ: MutableMapping[str, str] | os._Environ, name: str, default: int) -> int:
    value = environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name}={value!r}: expected a positive whole number")
    return int(value)


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _flag(environ: MutableMapping[str, str] | os._Environ, name: str) -> bool:
    return environ.get(name, "").strip().lower() in ("yes", "1", "true", "on")


def _hosts(value: str) -> tuple[str, ...]:
    return tuple(h.strip().lower() for h in value.split(",") if h.strip())


@dataclass(frozen=True)
class ServeSettings:
    """The service's settings, from the environment (read once, at start-up)."""

    max_rows: int = 1000
    max_body_bytes: int = 1 << 20
    log_dir: Path = PREDICTION_LOG_DIR
    log_enabled: bool = True
    log_max_pending: int = 100_000
    log_stuck_s: int = 30
    workers: int = 1
    token: str | None = None
    feedback_token: str | None = None
    feedback_open: bool = False
    feedback_concurrency: int = 1
    allow_open: bool = False
    bind_host: str | None = None
    allowed_hosts: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None) -> ServeSettings:
        """SERVE_MAX_ROWS, SERVE_MAX_BODY_BYTES, SERVE_WORKERS, PREDICTION_LOG_DIR,
        PREDICTION_LOG (``off`` disables it), SERVE_LOG_MAX_PENDING (lines buffered while
        writes fail), SERVE_LOG_STUCK_S (seconds of failing writes before /readyz fails),
        SERVICE_API_TOKEN (``/predict`` and the OpenAPI
        page), SERVICE_FEEDBACK_TOKEN (``/feedback``), SERVE_FEEDBACK_OPEN (``yes``: feedback
        without a token), SERVE_FEEDBACK_CONCURRENCY (feedback requests a worker handles at
        once, 1), SERVE_ALLOW_OPEN (``yes``: serve a non-loopback address with no
        token), SERVE_BIND_HOST (the address served, as ``nox -s serve`` passes it on),
        SERVE_ALLOWED_HOSTS (``Host`` values accepted beside the loopback names and the bind
        address, comma-separated; ``*``: any)."""
        env = os.environ if environ is None else environ
        return cls(
            max_rows=_int_env(env, "SERVE_MAX_ROWS", cls.max_rows),
            max_body_bytes=_int_env(env, "SERVE_MAX_BODY_BYTES", cls.max_body_bytes),
            log_dir=Path(env.get(PREDICTION_LOG_ENV) or cls.log_dir),
            log_enabled=env.get("PREDICTION_LOG", "on").strip().lower() not in OFF,
            log_max_pending=_int_env(env, "SERVE_LOG_MAX_PENDING", cls.log_max_pending),
            log_stuck_s=_int_env(env, "SERVE_LOG_STUCK_S", cls.log_stuck_s),
            workers=_int_env(env, "SERVE_WORKERS", cls.workers),
            token=env.get("SERVICE_API_TOKEN") or None,
            feedback_token=env.get("SERVICE_FEEDBACK_TOKEN") or None,
            feedback_open=_flag(env, "SERVE_FEEDBACK_OPEN"),
            feedback_concurrency=_int_env(
                env, "SERVE_FEEDBACK_CONCURRENCY", cls.feedback_concurrency
            ),
            allow_open=_flag(env, "SERVE_ALLOW_OPEN"),
            bind_host=env.get("SERVE_BIND_HOST", "").strip().lower() or None,
            allowed_hosts=_hosts(env.get("SERVE_ALLOWED_HOSTS", "")),
        )

    def hosts(self) -> frozenset[str] | None:
        """The ``Host`` names accepted (None: any): loopback, the bind address, the allowlist."""
        if "*" in self.allowed_hosts:
            return None
        bound = (self.bind_host,) if self.bind_host else ()
        return frozenset((*LOOPBACK_HOSTS, *bound, *self.allowed_hosts))

    def exposure_error(self, host: str) -> str | None:
        """Why the service must not bind ``host`` (None: it may): a non-loopback address and
        a route anyone there could call, unless SERVE_ALLOW_OPEN says so."""
        if _loopback(host) or self.allow_open:
            return None
        if not self.token:
            return (
                f"refusing to serve on {host} without SERVICE_API_TOKEN: set it, or "
                "SERVE_ALLOW_OPEN=yes to let anyone who reaches the address call /predict"
            )
        if self.feedback_open and not self.feedback_token:
            return (
                f"refusing to serve on {host} with SERVE_FEEDBACK_OPEN and no "
                "SERVICE_FEEDBACK_TOKEN: set it, or SERVE_ALLOW_OPEN=yes"
            )
        return None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def torch_backend(environ: MutableMapping[str, str] | None = None) -> str:
    """The project's PyTorch build (``cpu``, ``cu128``, ``auto``), as ``nox`` passes it on."""
    return (os.environ if environ is None else environ).get("TORCH_BACKEND", "cpu")


Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Label = StrictStr | StrictInt


def row_model(spec: FeatureSpec) -> type[BaseModel]:
    """A pydantic model of one input row: the model's features by name, typed by kind."""
    types = {BOOLEAN: StrictBool, CATEGORICAL: Label}
    fields: dict[str, Any] = {}
    for name in spec.names:
        kind: Any = types.get(spec.kinds[name], Number)
        fields[name] = (kind | None if spec.missing == IMPUTE else kind, ...)
    return create_model("Row", __config__=ConfigDict(extra="forbid", frozen=True), **fields)


def rows_type(spec: FeatureSpec, max_rows: int) -> Any:
    """The type of the ``rows`` field: 1 to ``max_rows`` rows."""
    row = row_model(spec)
    # A model made at run time, which no static type describes.
    return Annotated[list[row], Field(min_length=1, max_length=max_rows)]  # type: ignore[valid-type]


# Request ids are uuid4 hex strings (what /predict answers in the X-Request-ID header).
RequestId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


def labels_type(max_rows: int) -> Any:
    """The type of feedback's ``labels``: 1 to ``max_rows`` class labels."""
    return Annotated[list[Label], Field(min_length=1, max_length=max_rows)]


class FeedbackError(ValueError):
    """Feedback that cannot be recorded; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def feedback_labels(labels: Sequence[Any], rows: int | None, classes: Sequence[str]) -> list[str]:
    """The true classes as the model names them; FeedbackError for an unknown request (404), a
    count that is not the request's row count, or a class the model does not know (422)."""
    if not rows:
        raise FeedbackError(404, "unknown request_id: send the X-Request-ID of a /predict answer")
    if len(labels) != rows:
        raise FeedbackError(422, f"labels: {len(labels)} given, the request had {rows} rows")
    true = [category_label(label) for label in labels]
    unknown = sorted({str(t) for t in true if t not in classes})
    if unknown:
        raise FeedbackError(
            422,
            f"labels: unknown classes {', '.join(unknown)}; the model knows {', '.join(classes)}",
        )
    return [str(t) for t in true]


class RecentRequests:
    """The ids this worker answered lately and their row counts (the newest ``size``)."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._rows: OrderedDict[str, int] = OrderedDict()

    def add(self, request_id: str, rows: int) -> None:
        self._rows[request_id] = rows
        if len(self._rows) > self.size:
            self._rows.popitem(last=False)

    def get(self, request_id: str) -> int | None:
        return self._rows.get(request_id)


# The largest float32: a standardised value above it is inf inside the model, then NaN.
FLOAT32_MAX = float(np.finfo(np.float32).max)


class InputError(ValueError):
    """Rows the model cannot compute (HTTP 422); ``problems`` name each row and field."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class NonFiniteError(ArithmeticError):
    """The model computed non-finite probabilities for ``rows`` (indexes in the request)."""

    def __init__(self, rows: Sequence[int]) -> None:
        super().__init__(f"non-finite probabilities for rows {list(rows)}")
        self.rows = list(rows)


def numbers(records: Sequence[dict[str, Any]], names: Sequence[str]) -> np.ndarray:
    """The numeric and boolean fields of ``records`` as float64 ``[N, len(names)]`` (NaN: null)."""
    return np.array(
        [[np.nan if r[n] is None else float(r[n]) for n in names] for r in records],
        dtype=np.float64,
    ).reshape(len(records), len(names))


def overflow_errors(
    records: Sequence[dict[str, Any]], names: Sequence[str], mean: Any, std: Any
) -> list[str]:
    """Each value that overflows float32 as given or once standardised (``(x - mean) / std``,
    computed in float64), as ``rows[i].field: why``; [] when every value is computable."""
    values = numbers(records, names)
    with np.errstate(all="ignore"):
        scaled = (values - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)
    bad = (np.abs(values) > FLOAT32_MAX) | (np.abs(scaled) > FLOAT32_MAX)
    return [
        f"rows[{i}].{names[j]}: {values[i, j]:g} overflows the model's float32 arithmetic"
        for i, j in zip(*np.nonzero(bad), strict=True)
    ]


def blame(
    records: Sequence[dict[str, Any]],
    rows: Sequence[int],
    names: Sequence[str],
    mean: Any,
    std: Any,
    finite: Callable[[list[dict[str, Any]]], bool],
) -> list[str]:
    """For each row the model computed non-finite results for, the field that causes it: the
    first (largest standardised magnitude first) whose value set to the training mean makes the
    row finite, per ``finite([row])``; ``rows[i]: ...`` when no single field does."""
    found = []
    for i in rows:
        scaled = np.abs((numbers([records[i]], names)[0] - np.asarray(mean)) / np.asarray(std))
        culprit = None
        for j in np.argsort(-np.nan_to_num(scaled, nan=-1.0)):
            if finite([{**records[i], names[j]: float(np.asarray(mean)[j])}]):
                culprit = names[j]
                break
        if culprit is None:
            found.append(f"rows[{i}]: its values together give a non-finite result in the model")
        else:
            value = records[i][culprit]
            found.append(f"rows[{i}].{culprit}: {value:g} gives a non-finite result in the model")
    return found


def predictions(labels: list[str], proba: list[list[float]], classes: list[str]) -> list[dict]:
    """``[{"label": ..., "probabilities": {class: p}}]`` in row order."""
    return [
        {"label": label, "probabilities": dict(zip(classes, row, strict=True))}
        for label, row in zip(labels, proba, strict=True)
    ]


class Guard:
    """ASGI middleware: what is refused before any parsing, and one log line per client error.

    In order: a ``Host`` not in the allowlist (400: DNS rebinding against a loopback service);
    a missing or wrong bearer token (401 with ``WWW-Authenticate: Bearer``; ``/feedback`` has
    its own token and is refused, 403, while it has none unless opened); a body that is not
    JSON (415), too large (413) or of unknown length (411); a JSON object with top-level fields
    the route does not take (422). Probes and metrics stay open. Tokens are compared in
    constant time and never logged. Each request gets an ``X-Request-ID`` (the id /predict
    logs its rows under); a 4xx is logged as one WARNING line with it, never the content.

    ``lanes`` bound how many requests of a route a worker handles at once: the others wait,
    their body read and checked, so that a burst of one route (labels sent in bulk to
    ``/feedback``) cannot crowd out another (``/predict``) on the worker's one event loop, and
    a client sending its body slowly holds no place in the lane.
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: ServeSettings | None = None,
        fields: dict[str, frozenset[str]] | None = None,
        lanes: dict[str, int] | None = None,
    ) -> None:
        settings = settings or ServeSettings()
        self.app, self.max_body, self.fields = app, settings.max_body_bytes, fields or {}
        self.lanes = {path: asyncio.Semaphore(n) for path, n in (lanes or {}).items()}
        self.hosts = settings.hosts()
        self.tokens = {"/feedback": settings.feedback_token}
        self.default_token = settings.token
        self.feedback_open = settings.feedback_open
        quiet_client_errors()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        headers = [(k, v) for k, v in scope.get("headers") or [] if k != REQUEST_ID.encode()]
        scope["headers"] = [*headers, (REQUEST_ID.encode(), request_id.encode())]
        status = 0

        async def answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            refused = self._refused(scope, dict(headers))
            if refused is not None:
                return await _reply(answer, *refused)
            if scope["method"] == "POST" and scope["path"] in self.fields:
                return await self._checked_body(scope, receive, answer)
            async with self._lane(scope):
                return await self.app(scope, receive, answer)
        finally:
            if 400 <= status < 500:
                logger.warning(
                    "%s %s answered %d (request %s)",
                    scope["method"],
                    scope["path"],
                    status,
                    request_id,
                )

    def _refused(self, scope: Scope, headers: dict[bytes, bytes]) -> tuple[Any, ...] | None:
        """(status, reason[, headers]) of a request refused from its headers, else None."""
        host = _host_name(headers.get(b"host", b""))
        if self.hosts is not None and host not in self.hosts:
            return 400, "Host not allowed: set SERVE_ALLOWED_HOSTS to serve this name"
        path = scope["path"]
        token = self.tokens.get(path, self.default_token)
        if token is None and path in self.tokens and not self.feedback_open:
            return 403, "feedback is closed: the service has no SERVICE_FEEDBACK_TOKEN"
        if token is not None and not _bearer(headers.get(b"authorization", b""), token):
            challenge = [(b"www-authenticate", b'Bearer realm="api"')]
            return 401, "missing or wrong bearer token (Authorization header)", challenge
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if kind != b"application/json" and not kind.endswith(b"+json"):
            return 415, "Content-Type must be application/json"
        length = headers.get(b"content-length")
        if length is None:
            return 411, "a Content-Length header is required"
        if not length.isdigit() or int(length) > self.max_body:
            return 413, f"request body over {self.max_body} bytes"
        return None

    async def _checked_body(self, scope: Scope, receive: Any, send: Any) -> None:
        """Read the body (bounded by Content-Length, checked before); 422 for top-level fields
        the route does not take; then hand the body on unchanged."""
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None  # not JSON: BentoML answers it (400)
        if isinstance(parsed, dict):
            unknown = sorted(set(parsed) - self.fields[scope["path"]])
            if unknown:
                expected = ", ".join(sorted(self.fields[scope["path"]]))
                return await _reply(
                    send, 422, f"unknown fields: {', '.join(unknown)}; expected: {expected}"
                )
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async with self._lane(scope):  # once the body is in: a slow sender holds no place
            await self.app(scope, replay, send)

    def _lane(self, scope: Scope) -> contextlib.AbstractAsyncContextManager[Any]:
        lane = self.lanes.get(scope["path"])
        return lane if lane is not None else contextlib.nullcontext()


def _host_name(host: bytes) -> str:
    """The name of a Host header, without the port (``[::1]:3000`` -> ``::1``)."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def _bearer(header: bytes, token: str) -> bool:
    """Whether ``header`` is ``Bearer <token>`` (the scheme in any case), in constant time."""
    scheme, _, given = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token.encode())


class _ClientErrors(logging.Filter):
    """Drops BentoML's ERROR-with-traceback for a request it refused as the client's fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None:
            return True
        code = getattr(getattr(error, "error_code", None), "value", 500)
        return not (type(error).__name__ == "ValidationError" or code < 500)


def quiet_client_errors() -> None:
    """Client errors are the Guard's one WARNING line, not BentoML's traceback."""
    http_log = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, _ClientErrors) for f in http_log.filters):
        http_log.addFilter(_ClientErrors())


async def _reply(send: Any, status: int, reason: str, extra: list | None = None) -> None:
    body = json.dumps({"error": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    await send({"type": "http.response.body", "body": body})


Scores = tuple[list[Any], list[Any]]  # labels and probability rows, in row order


class Batcher:
    """Scores the rows of concurrent requests in one model call (one worker, one event loop).

    A request queues its rows and awaits its share of the answer. One task scores what is queued:
    it first yields to the event loop ``yields`` times so that requests already received join,
    then calls ``score`` once on up to ``max_rows`` rows, and repeats while rows wait. A lone
    request is scored at once. When a combined call fails, each request of it is scored alone, so
    a bad request fails alone. Measured: the model call costs about the same for 1 or 32 rows.
    """

    def __init__(
        self, score: Callable[[list[Any]], Scores], max_rows: int = 1000, yields: int = 2
    ) -> None:
        self.score, self.max_rows, self.yields = score, max_rows, yields
        self._pending: list[tuple[Sequence[Any], asyncio.Future]] = []
        self._task: asyncio.Task | None = None

    async def __call__(self, records: Sequence[Any]) -> Scores:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._pending.append((records, future))
        if self._task is None:
            self._task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                for _ in range(self.yields):
                    await asyncio.sleep(0)
                batch: list[tuple[Sequence[Any], asyncio.Future]] = []
                size = 0
                while self._pending and (
                    not batch or size + len(self._pending[0][0]) <= self.max_rows
                ):
                    batch.append(self._pending.pop(0))
                    size += len(batch[-1][0])
                self._run(batch)
        finally:
            self._task = None

    def _run(self, batch: list[tuple[Sequence[Any], asyncio.Future]]) -> None:
        if len(batch) > 1:
            try:
                labels, proba = self.score([row for records, _ in batch for row in records])
            except Exception:
                for item in batch:
                    self._run([item])
                return
            start = 0
            for records, future in batch:
                end = start + len(records)
                if not future.done():
                    future.set_result((labels[start:end], proba[start:end]))
                start = end
            return
        records, future = batch[0]
        try:
            result = self.score(list(records))
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(result)


class Drain:
    """A graceful stop on SIGTERM, before the server's own (uvicorn's) handler runs.

    BentoML's arbiter keeps the listening socket open while its workers stop, so connections
    made meanwhile wait in the kernel's queue, unread, and are reset when it closes (measured:
    ~60 of 64 clients' requests under load). Here, on SIGTERM, the worker accepts what is
    queued at once and shuts the listening socket (new connections are refused, never left
    waiting), serves what it accepted, marks itself draining (``/readyz`` fails),
    and, ``read_s`` later (the requests of the connections just accepted are read by then),
    hands over to the server's handler: it answers every request it holds, then the
    service's shutdown hooks run (the prediction log is flushed), then the worker exits.
    """

    def __init__(self, read_s: float = 1.0) -> None:
        self.draining, self.read_s = False, read_s
        self._previous: Any = None

    def install(self) -> bool:
        """Take over SIGTERM in this worker (False: not the main thread, or no handler to
        hand over to: the server stops the usual way)."""
        previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is not threading.main_thread() or not callable(previous):
            return False
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # built outside the server's event loop
            return False
        self._previous = previous
        signal.signal(signal.SIGTERM, self._on_term)
        return True

    def _on_term(self, signum: int, frame: Any) -> None:
        self.draining = True
        self._loop.call_soon_threadsafe(self._stop_listening)
        # The server's stop closes connections whose request it has not read yet (as idle):
        # it comes once those just accepted have been read.
        self._loop.call_soon_threadsafe(
            self._loop.call_later, self.read_s, self._previous, signum, frame
        )

    def _stop_listening(self) -> None:
        """Accept every queued connection, shut each listening socket, in one step of the
        event loop (nothing can queue in between), then serve what was accepted as the server
        serves any connection: from now on new connections are refused, never left unread."""
        accepted: list[socket.socket] = []
        for listener in _listening_sockets():
            with contextlib.suppress(OSError):
                while True:  # until the queue is empty (BlockingIOError)
                    accepted.append(listener.accept()[0])
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RD)
            listener.close()
        factory = _protocol_factory(getattr(self._previous, "__self__", None))
        for connection in accepted:
            if factory is None:  # not uvicorn: refused rather than left waiting
                connection.close()
                continue
            connection.setblocking(False)
            self._loop.create_task(self._loop.connect_accepted_socket(factory, connection))


def _protocol_factory(server: Any) -> Callable[[], Any] | None:
    """What uvicorn's server makes of each connection it accepts (None: not uvicorn's)."""
    config = getattr(server, "config", None)
    if config is None or not hasattr(server, "server_state"):
        return None
    return functools.partial(
        config.http_protocol_class,
        config=config,
        server_state=server.server_state,
        app_state=server.lifespan.state,
    )


def _listening_sockets() -> list[socket.socket]:
    """A copy of each listening TCP socket this process holds (the server's, shared with its
    arbiter: shutting a copy shuts the socket)."""
    found: list[socket.socket] = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:  # not Linux: the server's own stop applies
        return found
    for name in names:
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:  # not a socket, or gone
            continue
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError:
            listening = 0
        if listening and sock.type == socket.SOCK_STREAM:
            found.append(sock)
        else:
            sock.close()
    return found
