"""``params.yaml``: one typed schema, validated once when a stage starts; errors a user fixes.

Every section is a pydantic model that forbids unknown keys (a typo must not be silently
ignored) and refuses values of the wrong kind instead of coercing them: ``seed: 42.9`` and
``stratify: "false"`` are errors, not 42 and True. Each error names the key, the bad value and
what is valid. Stages receive the parsed :class:`Params` and hand each module its own section.
"""

from __future__ import annotations

import difflib
import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from .paths import PARAMS_FILE


class ProjectError(Exception):
    """An expected failure: the message says what is wrong and how to fix it."""

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def _not_bool(value: Any) -> Any:
    # pydantic reads True as 1.0 for a float field: a YAML `yes` where a number belongs is a typo.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {value}")
    return value


# Finite numbers; numeric strings are accepted because YAML 1.1 reads `1e-3` as a string.
Number = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
Fraction = Annotated[Number, Field(gt=0, lt=1)]
Unit = Annotated[Number, Field(ge=0, le=1)]
Text = Annotated[str, Field(min_length=1)]


class Section(BaseModel):
    """A section of params.yaml: unknown keys are errors; values are immutable once parsed."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _column_list(value: Any, keyword: str, *, empty: bool) -> Any:
    """``keyword`` itself, or a list of distinct column names (non-empty unless ``empty``)."""
    if value == keyword:
        return value
    what = "a list" if empty else "a non-empty list"
    if (
        not isinstance(value, list)
        or not (value or empty)
        or not all(isinstance(v, str) for v in value)
    ):
        raise ValueError(f"expected '{keyword}' or {what} of column names")
    twice = sorted({v for v in value if value.count(v) > 1})
    if twice:
        raise ValueError(f"lists columns twice: {', '.join(twice)}")
    return value


class DataParams(Section):
    raw_path: Text
    target: Text
    # "all" = every column except the target; or a list of column names.
    features: Literal["all"] | list[Text] = "all"
    # Gaps: refuse the file, drop the rows, or let the model fill them (learned on the train split).
    missing: Literal["error", "drop", "impute"] = "error"
    # "auto" = infer each column's kind; or the list of exactly the categorical columns.
    categorical: Literal["auto"] | list[Text] = "auto"
    # More distinct labels than this in a categorical column is an error (an ID, a date, text?).
    max_categories: Annotated[StrictInt, Field(ge=2)] = 100

    @field_validator("features", mode="before")
    @classmethod
    def _features(cls, value: Any) -> Any:
        return _column_list(value, "all", empty=False)

    @field_validator("categorical", mode="before")
    @classmethod
    def _categorical(cls, value: Any) -> Any:
        return _column_list(value, "auto", empty=True)


class SplitParams(Section):
    # hash: a row's split is a pure function of the row and the salt (stable as rows are
    # appended); random: a seeded shuffle of the whole file (moves rows whenever the file changes).
    method: Literal["hash", "random"] = "hash"
    # Fixed when the project is created; changing it re-splits every row (a new holdout).
    salt: Text = "mlops"
    # A column naming each row (kept out of the features): its value alone decides the split, so
    # a corrected row keeps its place. null: the row's feature values decide.
    id_column: Text | None = None
    val_size: Fraction
    test_size: Fraction
    stratify: StrictBool = True  # method: random only (hash keeps class shares in expectation)

    @model_validator(mode="after")
    def _room_for_training(self) -> SplitParams:
        if self.val_size + self.test_size >= 1:
            raise ValueError(
                f"val_size + test_size = {self.val_size + self.test_size:g} leaves no training "
                "rows: make their sum smaller than 1"
            )
        return self


class ModelParams(Section):
    hidden_sizes: list[Annotated[StrictInt, Field(gt=0)]] = [64, 32]
    dropout: Annotated[Number, Field(ge=0, lt=1)] = 0.1


class TrainParams(Section):
    device: Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")] = "auto"
    epochs: Annotated[StrictInt, Field(ge=1)]
    batch_size: Annotated[StrictInt, Field(ge=1)]
    lr: Annotated[Number, Field(gt=0)]
    weight_decay: Annotated[Number, Field(ge=0)] = 0.0
    patience: Annotated[StrictInt, Field(ge=0)] = 0
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    resume: Literal["auto", "always", "never"] = "auto"
    checkpoint_dir: Text = "checkpoints"
    # Write the checkpoint every N epochs (and always after the last one).
    checkpoint_every: Annotated[StrictInt, Field(ge=1)] = 10
    # Threads of a CPU run (0: PyTorch's default, one per core).
    cpu_threads: Annotated[StrictInt, Field(ge=0)] = 1


class SliceParams(Section):
    # Feature columns to slice the test rows by, each on its own: a categorical or boolean column
    # by its values, a numeric one in `bins` quantile bins whose edges come from the train split
    # (so champion and candidate are sliced alike). [] turns slicing and the slice rule off.
    columns: list[Text] = []
    bins: Annotated[StrictInt, Field(ge=2, le=20)] = 2

    @field_validator("columns", mode="before")
    @classmethod
    def _columns(cls, value: Any) -> Any:
        twice = sorted({v for v in value if value.count(v) > 1}) if isinstance(value, list) else []
        if twice:
            raise ValueError(f"lists columns twice: {', '.join(map(str, twice))}")
        return value


class EvaluateParams(Section):
    metric: Literal["accuracy", "f1", "roc_auc"] = "f1"
    min_score: Unit = 0.0
    # The challenger must beat the champion by more than this: a tie never promotes.
    promotion_margin: Annotated[Number, Field(gt=0, le=1)] = 0.001
    # Fewer test rows that neither model trained on than this: the gate cannot judge (undecided).
    min_holdout: Annotated[StrictInt, Field(ge=1)] = 30
    slices: SliceParams = SliceParams()
    # The slice rule: a candidate that would be promoted is refused (exit 3) when its accuracy on
    # any slice of at least min_slice_rows holdout rows is below the champion's by more than
    # max_slice_drop. Smaller slices are reported, never judged (a few rows are mostly noise).
    max_slice_drop: Unit = 0.1
    min_slice_rows: Annotated[StrictInt, Field(ge=1)] = 30


class ServeParams(Section):
    # Shadow scoring: the service also scores the `challenger` (when `nox -s deploy` finds one)
    # after answering, and logs its answers beside the champion's; clients see the champion's.
    shadow: StrictBool = False


class MonitorParams(Section):
    # The window `nox -s monitor` reads by default: the log's last N days (UTC).
    window_days: Annotated[StrictInt, Field(ge=1)] = 7
    # Fewer rows than this in the window: status insufficient_data (drift tests mean little).
    min_rows: Annotated[StrictInt, Field(ge=1)] = 50
    # Drift (monitoring/drift.py): K-S for numbers, chi-square homogeneity for categories; the
    # chance that a run on unshifted data alarms, across all its columns (weighted Bonferroni).
    drift_alpha: Fraction = 0.01
    # A column drifts only if it also moved this far: numbers, the Wasserstein distance in the
    # reference's standard deviations; categories, the total variation distance of their shares.
    min_effect_numeric: Annotated[Number, Field(ge=0)] = 0.1
    min_effect_categorical: Unit = 0.05
    # Feature weights: {} = every feature alike; else {column: weight}, unlisted columns weigh 0
    # (watched, reported, never raising drift alone). Status drift when any weighted feature
    # drifts, or at least drift_share of all features do.
    importance: dict[Text, Annotated[Number, Field(ge=0)]] = {}
    drift_share: Annotated[Number, Field(gt=0, le=1)] = 0.3
    # Ground truth: at least this many labelled rows of a model version before its accuracy is
    # judged; status degraded when a one-sided exact binomial test says, at level quality_alpha,
    # that its accuracy is below its test accuracy minus max_accuracy_drop.
    min_labelled_rows: Annotated[StrictInt, Field(ge=1)] = 30
    max_accuracy_drop: Unit = 0.05
    quality_alpha: Fraction = 0.05
    # Report folders kept under reports/monitoring/ (the newest N; latest/ besides).
    keep_reports: Annotated[StrictInt, Field(ge=1)] = 30

    @field_validator("importance")
    @classmethod
    def _some_weight(cls, value: dict[str, float]) -> dict[str, float]:
        if value and not any(w > 0 for w in value.values()):
            raise ValueError("gives every feature weight 0: give at least one a positive weight")
        return value


class MlflowParams(Section):
    tracking_uri: Text
    experiment: Text
    model_name: Text
    # A tracking server's requests: seconds each may wait, and retries (MLflow's own defaults,
    # 120 s and 7 retries, take minutes to give up on an unreachable server). The variables
    # MLFLOW_HTTP_REQUEST_TIMEOUT / MLFLOW_HTTP_REQUEST_MAX_RETRIES win when set.
    request_timeout: Annotated[StrictInt, Field(ge=1)] = 8
    request_retries: Annotated[StrictInt, Field(ge=0)] = 2

    @field_validator("tracking_uri")
    @classmethod
    def _no_password(cls, value: str) -> str:
        # params.yaml is committed and every value is logged as an MLflow param.
        if re.match(r"[^:/]+://[^/@:]*:[^/@]*@", value):
            raise ValueError(
                "holds a password (user:password@): set MLFLOW_TRACKING_URI, or "
                "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN, "
                "in the environment instead"
            )
        return value


class Params(Section):
    """The whole of params.yaml."""

    seed: Annotated[StrictInt, Field(ge=0, lt=2**32)]
    data: DataParams
    split: SplitParams
    model: ModelParams = ModelParams()
    train: TrainParams
    evaluate: EvaluateParams = EvaluateParams()
    mlflow: MlflowParams
    serve: ServeParams = ServeParams()
    monitor: MonitorParams = MonitorParams()

    def flat(self) -> dict[str, str]:
        """``{"train.lr": "0.001", ...}``: every value as a string, for MLflow params."""
        return _flatten(self.model_dump(mode="json"))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:500]
    return flat


def _where(loc: tuple[Any, ...]) -> str:
    """``("model", "hidden_sizes", 0)`` -> ``model.hidden_sizes[0]``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not str(part).startswith(("literal[", "list[")):  # union branches: not a key
            text += f".{part}" if text else str(part)
    return text


def _describe(error: ErrorDetails) -> str:
    """One line for one pydantic error: the key, the value found, and what is valid."""
    key, kind = _where(error["loc"]), error["type"]
    if kind == "missing":
        return f"{key}: required key is missing (see the template's params.yaml)"
    if kind == "extra_forbidden":
        parent = _model_at(error["loc"][:-1])
        known = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(error["loc"][-1]), known, n=1)
        hint = f" did you mean '{close[0]}'?" if close else ""
        return f"{key}: unknown key.{hint} Valid keys here: {', '.join(known)}"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "bool_type":
        message = "expected true or false (unquoted)"
    # The value found, less any password in a URI: error messages end up in CI logs.
    found = re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", repr(error["input"]))
    return f"{key}: {message}, not {found}"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def parse_params(raw: Any, source: str | Path = PARAMS_FILE) -> Params:
    """Validate a params mapping; every problem is reported at once, one line each."""
    if not isinstance(raw, dict):
        raise ProjectError(
            f"{source} must be a YAML mapping of sections (seed, data, split, model, ...), "
            f"found {type(raw).__name__}"
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = "\n".join(f"  {_describe(e)}" for e in exc.errors())
        raise ProjectError(f"{source} is not valid:\n{lines}") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate the pipeline parameters in ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProjectError(
            f"{path} not found (cwd: {Path.cwd()}): run commands from the project root, "
            "where params.yaml lives"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProjectError(f"{path} cannot be read ({exc}): fix the file") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProjectError(f"{path} is not valid YAML: {exc}") from None
    return parse_params(raw, path)


def cli_errors(fn: Callable[..., int]) -> Callable[..., int]:
    """Make a ``main()`` print a ProjectError as ``error: ...`` on stderr and return its code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return fn(*args, **kwargs)
        except ProjectError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code

    return wrapper
