"""What the HTTP service checks and answers, without BentoML: settings, the request schema, the
answer, and the ASGI guard (token, body size). ``service.py`` wires these into BentoML.

The request schema is built from the model's own :class:`~.features.FeatureSpec`: one field per
feature, typed by its kind (numbers, true/false, category labels as text), unknown fields and
non-finite numbers refused. ``null`` is accepted only for a model trained with
``data.missing: impute`` (it learned fill values); any other model would refuse the gap anyway.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, create_model

from ..core.features import BOOLEAN, CATEGORICAL, IMPUTE, FeatureSpec, category_label
from .predlog import PREDICTION_LOG_DIR, PREDICTION_LOG_ENV

# Routes that answer without the token: probes and Prometheus must work without secrets.
OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})
REQUEST_ID = "x-request-id"
OFF = ("off", "0", "false", "no")

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


@dataclass(frozen=True)
class ServeSettings:
    """The service's settings, from the environment (read once, at start-up)."""

    max_rows: int = 1000
    max_body_bytes: int = 1 << 20
    log_dir: Path = PREDICTION_LOG_DIR
    log_enabled: bool = True
    workers: int = 1
    token: str | None = None

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None) -> ServeSettings:
        """SERVE_MAX_ROWS, SERVE_MAX_BODY_BYTES, SERVE_WORKERS, PREDICTION_LOG_DIR,
        PREDICTION_LOG (``off`` disables it), SERVICE_API_TOKEN."""
        env = os.environ if environ is None else environ
        return cls(
            max_rows=_int_env(env, "SERVE_MAX_ROWS", cls.max_rows),
            max_body_bytes=_int_env(env, "SERVE_MAX_BODY_BYTES", cls.max_body_bytes),
            log_dir=Path(env.get(PREDICTION_LOG_ENV) or cls.log_dir),
            log_enabled=env.get("PREDICTION_LOG", "on").strip().lower() not in OFF,
            workers=_int_env(env, "SERVE_WORKERS", cls.workers),
            token=env.get("SERVICE_API_TOKEN") or None,
        )


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


def predictions(labels: list[str], proba: list[list[float]], classes: list[str]) -> list[dict]:
    """``[{"label": ..., "probabilities": {class: p}}]`` in row order."""
    return [
        {"label": label, "probabilities": dict(zip(classes, row, strict=True))}
        for label, row in zip(labels, proba, strict=True)
    ]


class Guard:
    """ASGI middleware: the bearer token (when set) and the body size limit, before any parsing.

    Probes and metrics stay open. The token is compared in constant time and never logged.
    """

    def __init__(self, app: ASGIApp, token: str | None = None, max_body_bytes: int = 1 << 20):
        self.app, self.max_body = app, max_body_bytes
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and not hmac.compare_digest(
            headers.get(b"authorization", b""), self.expected
        ):
            return await _reply(send, 401, "missing or wrong bearer token (Authorization header)")
        length = headers.get(b"content-length")
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            return await _reply(send, 411, "a Content-Length header is required")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _reply(send, 413, f"request body over {self.max_body} bytes")
        return await self.app(scope, receive, send)


async def _reply(send: Any, status: int, reason: str) -> None:
    body = json.dumps({"error": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
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
