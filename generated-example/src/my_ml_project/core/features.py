"""How raw feature columns become the model's numbers: kinds, vocabularies, gaps, one encoding.

A feature is one of three kinds:

- ``numeric``: numbers. Infinities count as missing, like empty cells.
- ``boolean``: true/false, yes/no, y/n, t/f or 1/0 (any case), or real booleans; encoded as the
  number 0 or 1. Not a two-level category: MLflow's pyfunc of the pytorch flavour hands the model
  the frame's columns as float32 (True -> 1.0), so a model of numbers and booleans answers pyfunc
  exactly as :meth:`FeatureSpec.encode`; and a gap becomes the train split's share of true (a value
  between the two answers) rather than a majority vote.
- ``categorical``: labels, kept as text (stripped, Unicode NFC; a number as its shortest text, so
  ``3``, ``3.0`` and ``"3"`` are one label). Encoded as the label's position in the train split's
  vocabulary plus one; 0 is reserved for a label not in the vocabulary and for a missing one.

:meth:`FeatureSpec.encode` is the one way a frame of raw columns becomes model input: the training
data (``data.load_split``) and every served or scored row (``TabularClassifier.encode``) go
through it. No torch here: the prepare stage uses this module too.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import ProjectError

if TYPE_CHECKING:
    # pandas is imported where it is used: `bentoml serve` imports this module to build the
    # service before it starts a worker, and pandas' import (~0.3 s) there delayed readiness.
    import pandas as pd

NUMERIC, BOOLEAN, CATEGORICAL = "numeric", "boolean", "categorical"
KINDS = (NUMERIC, BOOLEAN, CATEGORICAL)
# Whatever the case; 1/0 also as numbers.
BOOLEAN_TEXT = {
    **dict.fromkeys(("true", "t", "yes", "y", "1"), 1.0),
    **dict.fromkeys(("false", "f", "no", "n", "0"), 0.0),
}
IMPUTE = "impute"


class ModelInputError(ProjectError):
    """Input rows do not match what the model reads (columns, kinds or gaps)."""


def _short(items: Sequence[object], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"


def _blank(value: Any) -> bool:
    """Missing: None, NaN, pandas' NA, or text that is only white space."""
    if isinstance(value, str):
        return not value.strip()
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # a list or an array is a value, not a gap
        return False


def category_label(value: Any) -> str | None:
    """The label of a categorical value (None when missing): stripped NFC text."""
    if _blank(value):
        return None
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if not math.isfinite(value):
            return None
        # A code column with a gap is read as floats: 3.0 must stay the label "3".
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return unicodedata.normalize("NFC", str(value)).strip() or None


def boolean_value(value: Any) -> float | None:
    """1.0, 0.0, NaN when missing, or None when the value is no boolean at all."""
    if _blank(value):
        return math.nan
    if isinstance(value, bool | np.bool_):
        return float(value)
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value) if value in (0, 1) else None
    return BOOLEAN_TEXT.get(str(value).strip().lower())


def number_value(value: Any) -> float | None:
    """The number (NaN when missing or infinite), or None when the value is no number."""
    if _blank(value):
        return math.nan
    if isinstance(value, bool | int | float | np.bool_ | np.integer | np.floating):
        number = float(value)
    else:
        text = str(value).strip()
        if "_" in text:  # float() reads "1_000"; a CSV reader does not
            return None
        try:
            number = float(text)
        except ValueError:
            return None
    return number if math.isfinite(number) else math.nan


def infer_kind(series: pd.Series, *, allow_categorical: bool = True) -> str:
    """The kind of a raw column: booleans; numbers; text (categorical, if allowed).

    A text column in which any value reads as a number (a decimal comma included) is taken as
    numeric: the text values are then errors that :func:`typed` names (a stray ``n/a?`` or
    ``12,5`` must not turn a column of measurements into categories). Integer codes that are
    really categories must be declared.
    """
    import pandas as pd

    if pd.api.types.is_bool_dtype(series):
        return BOOLEAN
    if pd.api.types.is_numeric_dtype(series):
        return NUMERIC
    values = [v for v in series.unique() if not _blank(v)]
    if values and all(boolean_value(v) is not None for v in values):
        return BOOLEAN
    if allow_categorical and all(number_value(str(v).replace(",", ".")) is None for v in values):
        return CATEGORICAL
    return NUMERIC


def _parsed(
    values: list[Any], parse: Callable[[Any], float | None]
) -> tuple[np.ndarray, np.ndarray]:
    """float64 values (NaN for gaps) and the mask of values ``parse`` refused."""
    parsed = [parse(v) for v in values]
    bad = np.array([v is None for v in parsed], dtype=bool)
    return np.array([math.nan if v is None else v for v in parsed], dtype=np.float64), bad


def _column(series: pd.Series, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """One column in its kind's values (float64 with NaN, or labels with None) and the mask of
    values of another kind. Plain numpy and Python: a one-row request must not pay for pandas."""
    import pandas as pd

    if kind == CATEGORICAL:
        labels = np.array([category_label(v) for v in series.tolist()], dtype=object)
        return labels, np.zeros(len(series), dtype=bool)
    if kind == NUMERIC and pd.api.types.is_numeric_dtype(series):  # booleans are 0 and 1
        numbers = series.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
        if not numbers.flags.writeable:  # an empty column of Arrow's memory, as pandas 2.3 does
            numbers = numbers.copy()
        numbers[~np.isfinite(numbers)] = np.nan
        return numbers, np.zeros(len(series), dtype=bool)
    return _parsed(series.tolist(), number_value if kind == NUMERIC else boolean_value)


def _check_present(frame: pd.DataFrame, names: list[str]) -> None:
    absent = [name for name in names if name not in frame.columns]
    if absent:
        raise ModelInputError(
            f"input lacks {len(absent)} of the model's {len(names)} feature columns: "
            f"{', '.join(absent)}. Provide every column in model.feature_names "
            "(extra columns are ignored)."
        )


def _columns(frame: pd.DataFrame, kinds: Mapping[str, str]) -> dict[str, np.ndarray]:
    """:func:`_column` of each feature, by name; errors name missing columns and wrong values."""
    names = list(kinds)
    _check_present(frame, names)
    columns: dict[str, np.ndarray] = {}
    problems: dict[str, list[str]] = {NUMERIC: [], BOOLEAN: []}
    for name in names:
        columns[name], bad = _column(frame[name], kinds[name])
        if bad.any():
            count = int(bad.sum())
            example = frame[name].to_numpy(dtype=object)[bad][0]
            values = "1 value" if count == 1 else f"{count} values"
            problems[kinds[name]].append(f"{name} ({values}, e.g. {example!r})")
    if problems[NUMERIC] or problems[BOOLEAN]:
        found = [
            f"{what} values in {kind} feature columns: {'; '.join(problems[kind])}"
            for kind, what in ((NUMERIC, "non-numeric"), (BOOLEAN, "non-boolean"))
            if problems[kind]
        ]
        raise ModelInputError(". ".join(found))
    return columns


def _columns_lenient(
    frame: pd.DataFrame, kinds: Mapping[str, str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """:func:`_column` of each feature with its mask of wrong values (missing columns raise)."""
    _check_present(frame, list(kinds))
    return {name: _column(frame[name], kind) for name, kind in kinds.items()}


def typed(frame: pd.DataFrame, kinds: Mapping[str, str]) -> pd.DataFrame:
    """The columns of ``kinds`` in that order, each in its kind's type: float64 numbers (NaN for
    gaps), nullable booleans, labels as text (None for gaps). Extra columns are left out.

    Raises ModelInputError naming the missing columns, or the columns holding values of another
    kind (with an example and a count).
    """
    import pandas as pd

    columns = _columns(frame, kinds)
    return pd.DataFrame(
        {
            name: pd.array(values, dtype="boolean") if kinds[name] == BOOLEAN else values
            for name, values in columns.items()
        },
        index=frame.index,
    )


def kinds_of(frame: pd.DataFrame) -> dict[str, str]:
    """The kind of each column of a frame :func:`typed` returned."""
    import pandas as pd

    kinds = {}
    for name in frame.columns:
        column = frame[name]
        if pd.api.types.is_bool_dtype(column):
            kinds[str(name)] = BOOLEAN
        elif pd.api.types.is_numeric_dtype(column):
            kinds[str(name)] = NUMERIC
        else:
            kinds[str(name)] = CATEGORICAL
    return kinds


def vocabulary(labels: pd.Series) -> list[str]:
    """The distinct labels of a typed categorical column, sorted (code = position + 1)."""
    return sorted({str(v) for v in labels.dropna()})


def embedding_size(n_levels: int) -> int:
    """Width of a category's embedding, ``n_levels`` counting the unknown level (fastai-like)."""
    return min(16, (n_levels + 1) // 2)


@dataclass(frozen=True)
class FeatureSpec:
    """What the model reads: columns in order, their kinds, the categories' vocabularies, and
    whether gaps are accepted (``missing == "impute"``, the data.missing it was trained with)."""

    names: tuple[str, ...]
    kinds: dict[str, str] = field(default_factory=dict)
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)
    missing: str = "error"

    @classmethod
    def build(
        cls,
        names: Iterable[str],
        kinds: Mapping[str, str] | None = None,
        categories: Mapping[str, Iterable[str]] | None = None,
        missing: str = "error",
    ) -> FeatureSpec:
        """Validated spec; ``kinds`` None means every column is numeric."""
        names = tuple(str(n) for n in names)
        kinds = (
            {n: NUMERIC for n in names} if kinds is None else {str(k): v for k, v in kinds.items()}
        )
        vocabularies = {str(k): tuple(str(v) for v in vs) for k, vs in (categories or {}).items()}
        if len(set(names)) != len(names) or set(kinds) != set(names):
            raise ValueError(f"kinds {sorted(kinds)} must name each feature {list(names)} once")
        odd = sorted({v for v in kinds.values() if v not in KINDS})
        if odd:
            raise ValueError(f"unknown kinds {odd}: use {', '.join(KINDS)}")
        expected = {n for n in names if kinds[n] == CATEGORICAL}
        if set(vocabularies) != expected:
            raise ValueError(f"categories {sorted(vocabularies)} must list {sorted(expected)}")
        return cls(names, {n: kinds[n] for n in names}, vocabularies, str(missing))

    @property
    def numeric(self) -> list[str]:
        """Columns encoded as numbers (numeric and boolean), in feature order."""
        return [n for n in self.names if self.kinds[n] != CATEGORICAL]

    @property
    def categorical(self) -> list[str]:
        """Columns encoded as codes, in feature order."""
        return [n for n in self.names if self.kinds[n] == CATEGORICAL]

    def typed(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The feature columns of ``frame`` by name, each in its kind's type (see :func:`typed`)."""
        return typed(frame, self.kinds)

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """float32 ``[N, F]``: the numeric and boolean columns (NaN for gaps), then the category
        codes (0 for an unknown or missing label), each group in feature order.

        Columns are read by name; extra ones are ignored. Gaps are errors unless the model was
        trained with ``data.missing: impute``. The array is column-major (each feature's values
        side by side): torch reads it as it is; ``np.ascontiguousarray`` for rows side by side.
        """
        import pandas as pd

        columns = _columns(frame, self.kinds)
        if self.missing != IMPUTE:
            gaps = {name: int(pd.isna(values).sum()) for name, values in columns.items()}
            listed = [f"{name} ({n})" for name, n in gaps.items() if n]
            if listed:
                raise ModelInputError(
                    f"missing or infinite values in columns: {_short(listed, 20)}; the model was "
                    f"trained with data.missing: {self.missing} (train with data.missing: impute "
                    "to fill gaps)"
                )
        # One row a feature, filled in place (cast as it is copied), then transposed: stacking
        # the columns side by side (np.stack(axis=1)) wrote one value at a time, 10 ms of a
        # 65,536-row chunk of 30 columns against 1 ms.
        encoded = np.empty((len(self.numeric) + len(self.categorical), len(frame)), np.float32)
        for i, name in enumerate(self.numeric):
            encoded[i] = columns[name]
        for i, name in enumerate(self.categorical, start=len(self.numeric)):
            codes = {label: code for code, label in enumerate(self.categories[name], start=1)}
            encoded[i] = [codes.get(v, 0) for v in columns[name]]
        return encoded.T

    def row_errors(self, frame: pd.DataFrame) -> np.ndarray:
        """Why each row cannot be encoded: an object array of reasons, None for a good row.

        For the rows of a frame :meth:`encode` refused (batch scoring rejects those rows and
        scores the others). Missing columns concern every row: they raise ModelInputError.
        """
        import pandas as pd

        columns = _columns_lenient(frame, self.kinds)
        reasons: list[list[str]] = [[] for _ in range(len(frame))]
        for name, (values, bad) in columns.items():
            for i in np.flatnonzero(bad):
                value = frame[name].iloc[i]
                reasons[i].append(f"{name}: {value!r} is not {self.kinds[name]}")
            if self.missing != IMPUTE:
                for i in np.flatnonzero(pd.isna(values) & ~bad):
                    reasons[i].append(f"{name}: missing value")
        return np.array(["; ".join(r) if r else None for r in reasons], dtype=object)

    def to_config(self) -> dict[str, Any]:
        """Plain lists and dicts (``torch.load(weights_only=True)`` reads them)."""
        return {
            "kinds": dict(self.kinds),
            "categories": {name: list(labels) for name, labels in self.categories.items()},
            "missing": self.missing,
        }
