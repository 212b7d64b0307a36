"""What a monitoring run decided, as ``result.json`` holds it: a typed record with a versioned
schema, so CI, dashboards and later runs read it without guessing.

``python -m <package>.monitoring.result`` prints the JSON Schema of the current version.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

# Bump on any change a reader could notice (a field renamed, removed, or of another type).
# Added keys inside the free-form sections do not bump it: readers of the version ignore them.
SCHEMA_VERSION = 2  # 2: drift entries hold p-values, effects, weights; quality a binomial test
# (since 2, quality.versions.<v>.slices: accuracy per slice of evaluate.slices, when configured)
Status = Literal["healthy", "drift", "degraded", "insufficient_data"]


@dataclass
class RowCounts:
    current: int  # rows judged: the window of the log, or the --current file
    reference: int  # the train split's rows
    labelled: int  # rows with ground truth and a prediction


@dataclass
class DriftSummary:
    # column -> method, score (p-value), threshold, effect, min_effect, weight, important, drifted
    features: dict[str, dict[str, Any]] = field(default_factory=dict)
    drifted_features: list[str] = field(default_factory=list)
    share: float | None = None  # drifted features / all features (None: not tested)
    prediction: dict[str, Any] | None = None  # drift of the predicted classes


@dataclass
class MonitorResult:
    """One monitoring run: the status CI acts on, why, and what it was computed from."""

    status: Status
    reasons: list[str]
    generated_at: str  # ISO 8601, UTC
    source: str  # the prediction log's folder, or the --current file
    window: dict[str, Any]
    rows: RowCounts
    model_versions: dict[str, int]  # served version -> rows in the window
    thresholds: dict[str, Any]  # params.yaml's monitor section, as used
    drift: DriftSummary = field(default_factory=DriftSummary)
    data_summary: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    shadow: dict[str, Any] | None = None
    reports: dict[str, str] = field(default_factory=dict)  # report name -> HTML file
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=_plain) + "\n"

    @classmethod
    def read(cls, path: Path) -> MonitorResult:
        """A result.json of this schema version (ValueError naming the problem otherwise)."""
        from pydantic import TypeAdapter, ValidationError

        raw = json.loads(path.read_text(encoding="utf-8"))
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{path}: schema_version {version!r}, this code reads {SCHEMA_VERSION}: "
                "run the monitor again to write it anew"
            )
        try:
            return TypeAdapter(cls).validate_python(raw)
        except ValidationError as exc:
            raise ValueError(f"{path}: not a monitoring result: {exc.errors()[0]['msg']}") from None


def json_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`MonitorResult` (draft 2020-12, as pydantic writes it)."""
    from pydantic import TypeAdapter

    schema = TypeAdapter(MonitorResult).json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
