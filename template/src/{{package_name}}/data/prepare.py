"""DVC stage ``prepare``: validate the raw CSV, split it, write parquet files and the schema.

Run it as ``python -m <package>.data`` from the project root. Reads the ``seed``, ``data`` and
``split`` sections of params.yaml. Each feature column gets a kind (numeric, boolean or
categorical, see :mod:`.features`); the splits hold the values in their kind's type, and the
schema records the kinds and, for categories, the vocabulary of the train split. Later stages
load the splits through :func:`load_split` and :func:`load_train_data`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.config import DataParams, Params, ProjectError, SplitParams, cli_errors, load_params
from ..core.features import (
    CATEGORICAL,
    IMPUTE,
    KINDS,
    FeatureSpec,
    ModelInputError,
    infer_kind,
    kinds_of,
    typed,
    vocabulary,
)
from ..core.fileio import atomic_write, atomic_write_text, file_md5, read_parquet
from ..core.paths import PROCESSED_DIR, ROW_KEYS_FILE, SCHEMA_FILE, SPLITS, module

FIX_COLUMNS = "edit data.raw_path / data.target / data.features in params.yaml"
FIX_KINDS = (
    "fix those values in the file, or list the column in data.categorical if it holds categories"
)
FIX_PREPARE = f"run `dvc repro prepare` (or `python -m {module('data.prepare')}`)"


class DataError(ProjectError):
    """The data does not match what params.yaml declares."""


@dataclass
class Schema:
    """What the model is trained on: feature columns in order, target column, class labels; the
    kind of each feature, each category's vocabulary (train split), the data.missing in force."""

    features: list[str]
    target: str
    classes: list[str]
    kinds: dict[str, str] = field(default_factory=dict)  # empty: every feature numeric
    categories: dict[str, list[str]] = field(default_factory=dict)
    missing: str = "error"

    @property
    def spec(self) -> FeatureSpec:
        """How the model reads the features (what :func:`to_arrays` encodes with)."""
        return FeatureSpec.build(self.features, self.kinds or None, self.categories, self.missing)

    def save(self, path: str | Path, **metadata: Any) -> None:
        """Write the schema plus free-form ``metadata`` (row counts, hashes) as JSON."""
        text = json.dumps({**asdict(self), **metadata}, indent=2, ensure_ascii=False)
        atomic_write_text(path, text + "\n")  # UTF-8: category labels stay readable

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        """Read a schema written by :meth:`save` (extra metadata is ignored)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            schema = cls(
                features=[str(f) for f in raw["features"]],
                target=str(raw["target"]),
                classes=[str(c) for c in raw["classes"]],
                kinds={str(k): str(v) for k, v in raw.get("kinds", {}).items()},
                categories={
                    str(k): [str(c) for c in v] for k, v in raw.get("categories", {}).items()
                },
                missing=str(raw.get("missing", "error")),
            )
            schema.spec  # noqa: B018 (validates kinds against features and categories)
            return schema
        except FileNotFoundError:
            raise DataError(f"{path} not found: {FIX_PREPARE}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{path} is not a valid schema ({exc!r}): {FIX_PREPARE}") from None


def _canonical(column: pd.Series) -> pd.Series:
    """A column's values as text that does not depend on the file's formatting or dtype: numbers
    to 12 significant digits (1, 1.0 and 1e0 agree, and so do two parses of one decimal that
    differ in the last bit), booleans as 0/1, text as is, gaps as NUL."""
    if pd.api.types.is_bool_dtype(column):
        out = column.map({True: "1", False: "0"})
    elif pd.api.types.is_numeric_dtype(column):
        out = column.astype("float64").map(lambda v: "\0" if v != v else format(v + 0.0, ".12g"))
    else:
        out = column.astype("string")
    return out.astype(object).where(column.notna(), "\0")


def _digest64(texts: Sequence[str], salt: bytes = b"") -> np.ndarray:
    """blake2b of each text (salted), as unsigned 64-bit integers."""
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8, key=salt).digest(), "big")
            for t in texts
        ),
        dtype=np.uint64,
        count=len(texts),
    )


def row_keys(df: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """Each row's key: a hash of its values in ``columns`` (order-free: by name), unsalted, so
    that a key means the same row whatever the split rule. Identical rows share a key."""
    names = sorted(columns)
    if not len(df):
        return np.zeros(0, dtype=np.uint64)
    parts = [name + "=" + _canonical(df[name]) for name in names]
    texts = parts[0].str.cat(parts[1:], sep="\x1f") if len(parts) > 1 else parts[0]
    return _digest64(texts.tolist())


def hash_split(keys: np.ndarray, salt: str, val_size: float, test_size: float) -> np.ndarray:
    """Each key's split (an array of "train" / "val" / "test"): a pure function of the key and
    the salt, so appending rows never moves one."""
    salted = _digest64([format(int(k), "016x") for k in keys], salt.encode()[:64])
    u = salted.astype(np.float64) / 2.0**64
    return np.where(u < test_size, "test", np.where(u < test_size + val_size, "val", "train"))


@dataclass(frozen=True)
class _Expect:
    """What params.yaml declares about the raw file; builds errors that repeat it."""

    path: Path
    target: str
    features: str | list[str]
    id_column: str | None = None

    def error(self, problem: str, fix: str = FIX_COLUMNS) -> DataError:
        if isinstance(self.features, str):
            feats = "every other column"
        else:
            feats = _short_list(self.features)
        return DataError(
            f"{self.path}: {problem}\n"
            f"  expected columns: target {self.target!r}; features: {feats}\n"
            f"  fix: {fix}"
        )


def _short_list(items: Sequence[object], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"


def _read_csv(exp: _Expect) -> pd.DataFrame:
    if not exp.path.is_file():
        what = "is a directory, not a file" if exp.path.is_dir() else "not found"
        raise exp.error(f"raw data file {what}")
    try:
        with warnings.catch_warnings():
            # Rows longer than the header would be cut silently (or turned into an index).
            warnings.simplefilter("error", pd.errors.ParserWarning)
            # Labels stay text, so "1" and "01" or "1.0" are never confused.
            df = pd.read_csv(exp.path, dtype={exp.target: str}, index_col=False)
    except pd.errors.EmptyDataError:
        raise exp.error(
            "the file is empty", f"put a CSV with a header row there, or {FIX_COLUMNS}"
        ) from None
    except (pd.errors.ParserError, pd.errors.ParserWarning) as exc:
        raise exp.error(f"not a valid CSV ({str(exc).strip()})", "fix the file") from None
    except UnicodeDecodeError:
        raise exp.error("not UTF-8 text", "save the file as UTF-8 CSV") from None
    if df.empty:
        raise exp.error("the file has a header but no data rows", "add rows to the file")
    return df


def _select_features(df: pd.DataFrame, exp: _Expect) -> list[str]:
    columns = [str(c) for c in df.columns]
    if exp.target not in columns:
        hint = ""
        if len(columns) == 1 and any(sep in columns[0] for sep in ";\t|"):
            hint = " (is the file comma-separated?)"
        raise exp.error(
            f"target column {exp.target!r} not found; columns in the file: "
            f"{_short_list(columns, 20)}{hint}"
        )
    if exp.id_column is not None:
        if exp.id_column not in columns:
            raise exp.error(
                f"split.id_column {exp.id_column!r} not found; columns in the file: "
                f"{_short_list(columns, 20)}",
                "set split.id_column to the column naming each row, or to null",
            )
        if exp.id_column == exp.target or (
            isinstance(exp.features, list) and exp.id_column in exp.features
        ):
            raise exp.error(
                f"split.id_column {exp.id_column!r} is also the target or a feature",
                "an id names a row: leave it out of data.features and data.target",
            )
    if exp.features == "all":
        features = [c for c in columns if c not in (exp.target, exp.id_column)]
    elif isinstance(exp.features, list) and all(isinstance(f, str) for f in exp.features):
        features = list(exp.features)
    else:
        raise exp.error(
            f"data.features must be 'all' or a list of column names, not {exp.features!r}"
        )
    if not features:
        raise exp.error("no feature columns: the file holds only the target")
    if exp.target in features:
        raise exp.error(f"the target {exp.target!r} is also listed in data.features")
    duplicated = sorted({f for f in features if features.count(f) > 1})
    if duplicated:
        raise exp.error(f"data.features lists columns twice: {', '.join(duplicated)}")
    absent = [f for f in features if f not in columns]
    if absent:
        raise exp.error(
            f"feature columns not found: {', '.join(absent)}; columns in the file: "
            f"{_short_list(columns, 20)}"
        )
    return features


def _decide_kinds(
    df: pd.DataFrame, features: list[str], categorical: str | list[str], exp: _Expect
) -> dict[str, str]:
    """``auto``: infer every kind; a list: exactly those columns are categorical."""
    if categorical == "auto":
        return {name: infer_kind(df[name]) for name in features}
    listed = list(categorical)
    strangers = [name for name in listed if name not in features]
    if strangers:
        raise exp.error(
            f"data.categorical lists columns that are not features: {', '.join(strangers)}",
            "list only feature columns in data.categorical (or set it to auto)",
        )
    return {
        name: CATEGORICAL if name in listed else infer_kind(df[name], allow_categorical=False)
        for name in features
    }


def _typed(df: pd.DataFrame, kinds: dict[str, str], exp: _Expect) -> pd.DataFrame:
    """Feature values in their kind's type, then the target as text."""
    try:
        values = typed(df, kinds)
    except ModelInputError as exc:
        raise exp.error(str(exc), FIX_KINDS) from None
    empty = [name for name in kinds if values[name].isna().all()]
    if empty:
        raise exp.error(
            f"feature columns without a single value: {', '.join(empty)}",
            "leave them out of data.features, or fill them in the file",
        )
    values = values.assign(**{exp.target: df[exp.target]})
    if exp.id_column is not None:
        ids = df[exp.id_column].astype("string").str.strip()
        if ids.isna().any() or (ids == "").any():
            n = int((ids.isna() | (ids == "")).sum())
            raise exp.error(
                f"{n} rows have no value in split.id_column {exp.id_column!r}",
                "give every row an id, or set split.id_column: null",
            )
        values = values.assign(**{exp.id_column: ids.astype(object)})
    return values


def _check_categories(df: pd.DataFrame, max_categories: int, exp: _Expect) -> None:
    kinds = kinds_of(df.drop(columns=[exp.target, *filter(None, [exp.id_column])]))
    counts = {name: df[name].nunique() for name, kind in kinds.items() if kind == CATEGORICAL}
    many = [f"{name} ({n})" for name, n in counts.items() if n > max_categories]
    if many:
        raise exp.error(
            f"categorical columns with more than data.max_categories={max_categories} distinct "
            f"values: {', '.join(many)}. An identifier, a date or free text is no category",
            "leave such columns out of data.features, or raise data.max_categories if they are "
            "categories",
        )


def _handle_missing(
    df: pd.DataFrame, features: list[str], missing: str, exp: _Expect
) -> pd.DataFrame:
    # typed() made infinite values NaN: they break training just like gaps.
    # Under impute the model fills feature gaps; a row without a label is of no use at all.
    checked = [exp.target] if missing == IMPUTE else [*features, exp.target]
    bad = df[checked].isna()
    bad_rows = bad.any(axis=1)
    n_bad = int(bad_rows.sum())
    if n_bad and missing == "error":
        per_column = bad.sum()
        cols = [f"{c} ({int(n)})" for c, n in per_column[per_column > 0].items()]
        raise exp.error(
            f"{n_bad} of {len(df)} rows have missing or infinite values in: "
            f"{_short_list(cols, 20)}",
            "set data.missing: impute or drop, or clean the file",
        )
    if n_bad:
        what = "without a target" if missing == IMPUTE else "with missing or infinite values"
        print(f"dropped {n_bad} of {len(df)} rows {what} (data.missing: {missing})")
        df = df.loc[~bad_rows].reset_index(drop=True)
    gaps = df[features].isna().sum()
    if missing == IMPUTE and gaps.any():
        listed = [f"{c} ({int(n)})" for c, n in gaps[gaps > 0].items()]
        print(f"data.missing: impute: the model fills the gaps in {_short_list(listed)}")
    return df


def read_raw(
    path: str | Path,
    target: str,
    features: str | list[str] = "all",
    missing: str = "error",
    categorical: str | list[str] = "auto",
    max_categories: int = 100,
    id_column: str | None = None,
) -> pd.DataFrame:
    """Load the raw CSV and validate it: the feature columns in order, each in its kind's type
    (float64, nullable boolean, text), then the target as text (then ``id_column``, as text)."""
    exp = _Expect(Path(path), target, features, id_column)
    df = _read_csv(exp)
    cols = _select_features(df, exp)
    df = _typed(df, _decide_kinds(df, cols, categorical, exp), exp)
    _check_categories(df, max_categories, exp)
    df = _handle_missing(df, cols, missing, exp)
    if df.empty:
        raise exp.error("no rows left after dropping missing values", "clean the file")
    df = df.assign(**{target: df[target].str.strip()})
    n_classes = df[target].nunique()
    if n_classes < 2:
        raise exp.error(
            f"target {target!r} has {n_classes} class: a classifier needs at least 2",
            "choose another data.target, or add rows of the other classes",
        )
    return df


def _check_class_sizes(df: pd.DataFrame, val_size: float, test_size: float, exp: _Expect) -> None:
    """Fail clearly unless a stratified split can give every split at least one row per class."""
    needed = max(3, math.ceil(1 / min(val_size, test_size)))
    counts = df[exp.target].value_counts()
    small = counts[counts < needed]
    if len(small):
        listed = ", ".join(f"class {label!r} has {int(n)}" for label, n in small.items())
        raise exp.error(
            f"too few rows for a stratified train/val/test split: {listed}; each class needs at "
            f"least {needed} (split.val_size={val_size}, split.test_size={test_size})",
            "add rows of those classes, merge rare classes, or set split.stratify: false",
        )


def split_frame(
    df: pd.DataFrame,
    target: str,
    val_size: float,
    test_size: float,
    seed: int,
    stratify: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Split into train/val/test (fractions of the whole), stratified on the target if asked."""
    from sklearn.model_selection import train_test_split

    # Row counts, not fractions: the second split's fraction of the rest would round unevenly.
    n_test = max(1, round(test_size * len(df)))
    n_val = max(1, round(val_size * len(df)))
    try:
        rest, test = train_test_split(
            df, test_size=n_test, random_state=seed, stratify=df[target] if stratify else None
        )
        train, val = train_test_split(
            rest, test_size=n_val, random_state=seed, stratify=rest[target] if stratify else None
        )
    except ValueError as exc:  # too few rows for the requested fractions
        raise DataError(f"cannot split {len(df)} rows ({exc}): add rows or edit split.*") from None
    return train.reset_index(drop=True), val.reset_index(drop=True), test.reset_index(drop=True)


def _split(
    df: pd.DataFrame, split: SplitParams, target: str, seed: int, exp: _Expect
) -> tuple[dict[str, pd.DataFrame], dict[str, np.ndarray]]:
    """The splits and each split's row keys (``split.method``)."""
    id_columns = [split.id_column] if split.id_column else []
    features = [c for c in df.columns if c not in (target, *id_columns)]
    keys = row_keys(df, id_columns or features)
    if split.method == "random":
        if split.stratify:
            _check_class_sizes(df, split.val_size, split.test_size, exp)
        keyed = df.assign(__key__=keys)
        frames = split_frame(keyed, target, split.val_size, split.test_size, seed, split.stratify)
        parts = dict(zip(SPLITS, frames, strict=True))
    else:
        where = hash_split(keys, split.salt, split.val_size, split.test_size)
        parts = {
            name: df.assign(__key__=keys)[where == name].reset_index(drop=True) for name in SPLITS
        }
        _check_hash_split(parts, df[target], split, exp)
    part_keys = {name: part.pop("__key__").to_numpy(np.uint64) for name, part in parts.items()}
    parts = {name: part.drop(columns=id_columns) for name, part in parts.items()}
    return parts, part_keys


def _check_hash_split(
    parts: dict[str, pd.DataFrame], labels: pd.Series, split: SplitParams, exp: _Expect
) -> None:
    """Every split holds every class: else too few rows for these fractions."""
    classes = sorted(labels.unique())
    for name, part in parts.items():
        absent = sorted(set(classes) - set(part[exp.target]))
        if absent:
            raise exp.error(
                f"the {name} split has no row of class {_short_list(absent)} "
                f"({len(part)} of {len(labels)} rows; split.method: hash)",
                "add rows of that class, raise split.val_size / test_size, or use "
                "split.method: random with stratify: true",
            )


def prepare(params: Params) -> Schema:
    """Validate the raw CSV, split it, write the parquet splits, the row keys and schema.json."""
    data: DataParams = params.data
    split: SplitParams = params.split
    raw_path, target, out_dir = Path(data.raw_path), data.target, PROCESSED_DIR
    df = read_raw(
        raw_path, target, data.features, data.missing, data.categorical, data.max_categories,
        split.id_column,
    )  # fmt: skip
    expect = _Expect(raw_path, target, data.features, split.id_column)
    parts, keys = _split(df, split, target, params.seed, expect)
    df = df.drop(columns=[split.id_column] if split.id_column else [])
    kinds = kinds_of(df.drop(columns=target))
    schema = Schema(
        features=list(kinds),
        target=target,
        classes=sorted(df[target].unique()),
        kinds=kinds,
        # Learned on the train split only: a label seen only in val or test is unknown (code 0).
        categories={c: vocabulary(parts["train"][c]) for c, k in kinds.items() if k == CATEGORICAL},
        missing=data.missing,
    )
    for name, part in parts.items():
        atomic_write(out_dir / f"{name}.parquet", partial(part.to_parquet, index=False))
    write_row_keys(out_dir / ROW_KEYS_FILE, keys)
    rows = {name: len(part) for name, part in parts.items()}
    schema.save(
        out_dir / SCHEMA_FILE,
        rows=rows,
        class_counts={str(k): int(v) for k, v in df[target].value_counts().sort_index().items()},
        raw={"path": raw_path.as_posix(), "md5": file_md5(raw_path), "rows_used": len(df)},
        seed=params.seed,
        split={"method": split.method, "salt": split.salt, "id_column": split.id_column},
    )
    counted = {kind: list(kinds.values()).count(kind) for kind in KINDS}
    print(
        f"prepared {len(df)} rows from {raw_path}: {len(schema.features)} features "
        f"({', '.join(f'{n} {kind}' for kind, n in counted.items() if n)}), "
        f"{len(schema.classes)} classes ({_short_list(schema.classes)})\n"
        f"  -> {out_dir}: " + ", ".join(f"{k} {v}" for k, v in rows.items())
    )
    return schema


def write_row_keys(path: Path, keys: dict[str, np.ndarray]) -> None:
    """Each split's row keys, in the split's row order: ``split``, ``key`` columns."""
    frame = pd.DataFrame(
        {
            "split": np.concatenate([np.full(len(k), name) for name, k in keys.items()]),
            "key": np.concatenate(list(keys.values())).astype(np.uint64),
        }
    )
    atomic_write(path, partial(frame.to_parquet, index=False))


def load_row_keys(name: str, processed_dir: str | Path = PROCESSED_DIR) -> np.ndarray:
    """The row keys of one prepared split, in its row order (DataError when absent)."""
    path = Path(processed_dir) / ROW_KEYS_FILE
    try:
        frame = read_parquet(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} cannot be read ({exc}): {FIX_PREPARE}") from None
    return frame.loc[frame["split"] == name, "key"].to_numpy(np.uint64)


def load_frame(name: str, processed_dir: str | Path = PROCESSED_DIR) -> tuple[pd.DataFrame, Schema]:
    """Read one prepared split as a DataFrame, with the schema it was written with."""
    if name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {name!r}")
    processed_dir = Path(processed_dir)
    schema = Schema.load(processed_dir / SCHEMA_FILE)
    path = processed_dir / f"{name}.parquet"
    try:
        df = read_parquet(path)
    except FileNotFoundError:
        raise DataError(f"{path} not found: {FIX_PREPARE}") from None
    absent = [c for c in [*schema.features, schema.target] if c not in df.columns]
    if absent:
        raise DataError(f"{path} lacks columns {', '.join(absent)} of {SCHEMA_FILE}: {FIX_PREPARE}")
    return df, schema


def to_arrays(df: pd.DataFrame, schema: Schema) -> tuple[np.ndarray, np.ndarray]:
    """Features encoded as the model reads them (``FeatureSpec.encode``: float32 [N, F], numbers
    then category codes); labels as int64 indices into schema.classes."""
    try:
        x = np.ascontiguousarray(schema.spec.encode(df))  # rows side by side: batches take rows
    except ModelInputError as exc:
        raise DataError(f"{exc}: {FIX_PREPARE}") from None
    index = {label: i for i, label in enumerate(schema.classes)}
    labels = df[schema.target].astype(str)
    unknown = sorted(set(labels) - index.keys())
    if unknown:
        raise DataError(
            f"labels {_short_list(unknown)} are not among the schema's classes "
            f"{_short_list(schema.classes)}: {FIX_PREPARE}"
        )
    y = labels.map(index).to_numpy(dtype=np.int64)
    return x, y


def load_split(
    name: str, processed_dir: str | Path = PROCESSED_DIR
) -> tuple[np.ndarray, np.ndarray, Schema]:
    """Load a prepared split as ``(x float32 [N, F], y int64 [N], schema)``."""
    df, schema = load_frame(name, processed_dir)
    x, y = to_arrays(df, schema)
    return x, y, schema


@dataclass
class TrainData:
    """Prepared train/val arrays, their schema, and the md5 of each file (as DVC computes it);
    ``example``: a few rows of the val split's feature columns, as prepared (MLflow's example)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    schema: Schema
    md5: dict[str, str]
    example: pd.DataFrame = field(default_factory=pd.DataFrame)
    # The keys of the train and val rows: what the model sees, recorded with its run.
    seen_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))


def load_train_data(processed_dir: str | Path = PROCESSED_DIR) -> TrainData:
    """Load the train and val splits written by the prepare stage, with their hashes."""
    folder = Path(processed_dir)
    x_train, y_train, schema = load_split("train", folder)
    val, _ = load_frame("val", folder)
    x_val, y_val = to_arrays(val, schema)
    if len(x_train) == 0 or len(x_val) == 0:
        raise ProjectError(f"{folder}: the train or val split is empty: use more data")
    md5 = {name: file_md5(folder / f"{name}.parquet") for name in ("train", "val")}
    md5["schema"] = file_md5(folder / SCHEMA_FILE)
    raw = json.loads((folder / SCHEMA_FILE).read_text(encoding="utf-8")).get("raw")
    if isinstance(raw, dict) and raw.get("md5"):
        md5["raw"] = str(raw["md5"])
    # Complete rows where there are: the MLflow signature reads each column's type from them.
    rows = val[schema.features]
    complete = rows.dropna()
    example = (complete if len(complete) >= 2 else rows).head(5).reset_index(drop=True)
    seen = np.concatenate([load_row_keys("train", folder), load_row_keys("val", folder)])
    return TrainData(x_train, y_train, x_val, y_val, schema, md5, example, seen)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prepare`` stage."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module('data.prepare')}",
        description="Validate the raw CSV and write the train/val/test splits.",
    )
    parser.add_argument("--params", default="params.yaml", help="parameters file (params.yaml)")
    args = parser.parse_args(argv)
    prepare(load_params(args.params))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
