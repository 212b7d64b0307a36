"""The prepare stage: validation of the raw CSV, the splits, and what later stages load."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from my_ml_project.core.config import Params, load_params
from my_ml_project.core.features import kinds_of
from my_ml_project.core.fileio import read_parquet
from my_ml_project.data.prepare import (
    DataError,
    Schema,
    load_split,
    main,
    prepare,
    read_raw,
    split_frame,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FEATURES = [f"feature_{i}" for i in range(4)]


def frame(rows: int = 60, **columns: list[Any]) -> pd.DataFrame:
    """Two numeric features and a binary label, with columns overridden by keyword."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {"a": rng.normal(size=rows), "b": rng.normal(size=rows), "y": ["no", "yes"] * (rows // 2)}
    )
    for name, values in columns.items():
        df[name] = values
    return df


@pytest.fixture
def write(tmp_path: Path) -> Callable[[pd.DataFrame], Path]:
    def write_frame(df: pd.DataFrame) -> Path:
        path = tmp_path / "raw.csv"
        df.to_csv(path, index=False)
        return path

    return write_frame


# --- the project's own data -------------------------------------------------------------------


def test_project_raw_data_is_valid(template_params: dict[str, Any]) -> None:
    data = template_params["data"]
    raw = PROJECT_ROOT / data["raw_path"]
    if not raw.exists() and raw.with_name(raw.name + ".dvc").exists():
        pytest.skip(f"{raw} is tracked by DVC and not pulled here: `nox -s pull` fetches it")
    df = read_raw(
        raw,
        data["target"],
        data["features"],
        data["missing"],
        data["categorical"],
        data["max_categories"],
    )
    features = list(df.columns[:-1])
    assert df.columns[-1] == data["target"]
    assert len(df) >= 100
    assert df[data["target"]].nunique() >= 2
    assert all(pd.api.types.is_numeric_dtype(df[c]) for c in features)
    assert not df.isna().any().any()


# --- validation: every error names the file, the expected columns and the fix -----------------


def test_missing_file_names_path_columns_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(DataError) as info:
        read_raw(path, "y", ["a", "b"])
    message = str(info.value)
    assert str(path) in message
    assert "not found" in message
    assert "'y'" in message
    assert "a, b" in message
    assert "data.raw_path" in message


def test_missing_target_column_lists_file_columns(write: Callable[..., Path]) -> None:
    path = write(frame())
    with pytest.raises(
        DataError, match=r"target column 'label' not found; columns in the file: a, b, y"
    ):
        read_raw(path, "label")


def test_missing_feature_columns_are_named(write: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match=r"feature columns not found: c, d"):
        read_raw(write(frame()), "y", ["a", "c", "d"])


def test_text_in_a_numeric_column_is_named(write: Callable[..., Path]) -> None:
    """Numbers with some text: an error naming the text, not a column of categories."""
    path = write(frame(b=["1.5", "n/a?"] * 30))
    with pytest.raises(DataError) as info:
        read_raw(path, "y")
    message = str(info.value)
    assert "non-numeric values in numeric feature columns: b (30 values, e.g. 'n/a?')" in message
    assert "list the column in data.categorical" in message
    read_raw(path, "y", categorical=["b"])  # declared: its labels are "1.5" and "n/a?"


def test_decimal_commas_are_named_not_taken_for_categories(write: Callable[..., Path]) -> None:
    path = write(frame(b=["12,5", "3,25"] * 30))
    with pytest.raises(DataError, match=r"columns: b \(60 values, e\.g\. '12,5'\)"):
        read_raw(path, "y")


def test_text_column_not_declared_categorical_is_an_error(write: Callable[..., Path]) -> None:
    path = write(frame(b=["red", "blue"] * 30, c=["x"] * 60))
    with pytest.raises(DataError, match=r"columns: b \(60 values, e\.g\. 'red'\)"):
        read_raw(path, "y", categorical=["c"])
    with pytest.raises(
        DataError, match=r"data\.categorical lists columns that are not features: d"
    ):
        read_raw(path, "y", categorical=["d"])


def test_kinds_are_inferred(write: Callable[..., Path]) -> None:
    rows = 60
    df = read_raw(
        write(
            frame(
                text=[" São Paulo ", "Zürich, CH", "日本", "a/b (c)"] * (rows // 4),
                flag=["yes", "No", "TRUE", None] * (rows // 4),
                bools=[True, False] * (rows // 2),
                binary=[0, 1] * (rows // 2),
            )
        ),
        "y",
        missing="impute",
    )
    assert kinds_of(df.drop(columns="y")) == {
        "a": "numeric",
        "b": "numeric",
        "text": "categorical",
        "flag": "boolean",
        "bools": "boolean",
        "binary": "numeric",
    }
    assert df["text"].iloc[:4].tolist() == ["São Paulo", "Zürich, CH", "日本", "a/b (c)"]
    assert df["flag"].iloc[:4].tolist() == [True, False, True, pd.NA]


def test_declared_integer_codes_become_labels(write: Callable[..., Path]) -> None:
    """Codes with a gap are read as floats: the labels must still be "1", "2", "10"."""
    df = read_raw(
        write(frame(store=[1, 2, 10, None] * 15)), "y", missing="impute", categorical=["store"]
    )
    assert df["store"].iloc[:4].tolist() == ["1", "2", "10", None]


def test_too_many_categories_is_an_error(write: Callable[..., Path]) -> None:
    path = write(frame(customer=[f"C-{i}" for i in range(60)]))
    with pytest.raises(DataError) as info:
        read_raw(path, "y", max_categories=50)
    message = str(info.value)
    assert "more than data.max_categories=50 distinct values: customer (60)" in message
    assert "raise data.max_categories" in message
    assert len(read_raw(path, "y", max_categories=60)) == 60


def test_empty_feature_column_is_refused(write: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match="feature columns without a single value: c"):
        read_raw(write(frame(c=[None] * 60)), "y", missing="impute")


def test_impute_keeps_feature_gaps_and_drops_rows_without_a_label(
    write: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    df = read_raw(
        write(frame(a=[np.nan, 1.0, np.inf] * 20, y=["no", "yes", None, "yes"] * 15)),
        "y",
        missing="impute",
    )
    assert len(df) == 45
    assert df["a"].isna().sum() == 30  # infinite values are gaps too
    out = capsys.readouterr().out
    assert "the model fills the gaps in a (30)" in out
    assert "dropped 15 of 60 rows without a target (data.missing: impute)" in out


def test_missing_values_error_names_columns_rows_and_fix(write: Callable[..., Path]) -> None:
    path = write(frame(a=[np.nan, 1.0, 2.0] * 20))
    with pytest.raises(DataError) as info:
        read_raw(path, "y", missing="error")
    message = str(info.value)
    assert "20 of 60 rows" in message
    assert "a (20)" in message
    assert "set data.missing: impute or drop, or clean the file" in message


def test_missing_values_drop(
    write: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    df = read_raw(write(frame(a=[np.nan, 1.0, np.inf] * 20)), "y", missing="drop")
    assert len(df) == 20
    assert np.isfinite(df[["a", "b"]].to_numpy()).all()
    assert "dropped 40 of 60 rows" in capsys.readouterr().out


def test_single_class_is_refused(write: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match="has 1 class: a classifier needs at least 2"):
        read_raw(write(frame(y=["yes"] * 60)), "y")


def test_too_small_class_is_named(project_dir: Path, update_params: Callable[..., Any]) -> None:
    params = load_params()
    df = pd.read_csv(params.data.raw_path)
    df.loc[:0, "label"] = "rare"  # one row: two of the three splits go without
    df.to_csv(params.data.raw_path, index=False)
    with pytest.raises(DataError, match=r"split has no row of class rare .*split.method: hash"):
        prepare(params)
    shuffled = update_params({"split": {"method": "random"}})
    with pytest.raises(DataError, match=r"class 'rare' has 1; each class needs at least 7"):
        prepare(shuffled)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "the file is empty"),
        (b"a,b,y\n", "no data rows"),
        (b"a,b,y\n1,2,no\n1,2,3,4,yes\n", "not a valid CSV"),
        (b"a,b,y\n1,2,\xff\xfe\n", "not UTF-8"),
    ],
)
def test_unreadable_csv(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "raw.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=problem):
        read_raw(path, "y")


def test_main_reports_bad_file_without_traceback(
    project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path(load_params().data.raw_path).write_text("feature_0,label\n1,2,3\n")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data/raw/synthetic.csv: not a valid CSV")
    assert "fix:" in err
    assert "Traceback" not in err


def test_main_without_params_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("error: params.yaml not found")


# --- splitting ----------------------------------------------------------------------------------


def test_split_sizes_and_stratification(tmp_path: Path, make_csv: Callable[..., Path]) -> None:
    df = pd.read_csv(make_csv(tmp_path / "d.csv", n_rows=400, n_classes=2, labels=["a", "b"]))
    df.loc[df.index[:100], "label"] = "a"  # unbalanced: proportions must survive the split
    train, val, test = split_frame(df, "label", val_size=0.15, test_size=0.15, seed=1)
    assert (len(train), len(val), len(test)) == (280, 60, 60)
    overall = df["label"].value_counts(normalize=True)
    for part in (train, val, test):
        shares = part["label"].value_counts(normalize=True)
        assert shares.index.sort_values().tolist() == ["a", "b"]
        assert np.allclose(shares.sort_index(), overall.sort_index(), atol=0.02)


def test_read_parquet_reads_what_pandas_reads(tmp_path: Path) -> None:
    """The unthreaded reader (core.fileio) gives pandas' frame: dtypes, categories, text, nulls."""
    frame = pd.DataFrame(
        {
            "x": [1.5, np.nan, -2.0],
            "n": [1, 2, 3],
            "flag": [True, False, True],
            "text": ["Básico", None, "日本"],
            "cat": pd.Categorical(["a", "b", "a"]),
        }
    )
    path = tmp_path / "frame.parquet"
    frame.to_parquet(path, index=False)
    expected = pd.read_parquet(path)  # noqa: TID251 (the reference)
    pd.testing.assert_frame_equal(read_parquet(path), expected)
    pd.testing.assert_frame_equal(read_parquet(path, ["n", "cat"]), expected[["n", "cat"]])
    with pytest.raises(FileNotFoundError):
        read_parquet(tmp_path / "absent.parquet")


def _splits() -> dict[str, pd.DataFrame]:
    return {s: read_parquet(f"data/processed/{s}.parquet") for s in ("train", "val", "test")}


def _assignment() -> dict[int, str]:
    """Row key -> split, as prepare wrote them."""
    keys = read_parquet("data/processed/row_keys.parquet")
    return dict(zip(keys["key"].tolist(), keys["split"].tolist(), strict=True))


def test_prepare_is_deterministic(project_dir: Path, update_params: Callable[..., Any]) -> None:
    prepare(load_params())
    first = _splits()
    prepare(load_params())
    for split, df in first.items():
        pd.testing.assert_frame_equal(read_parquet(f"data/processed/{split}.parquet"), df)
    # The hash split ignores the seed (it is the training's): no row moves.
    prepare(update_params({"seed": 7}))
    for split, df in first.items():
        pd.testing.assert_frame_equal(read_parquet(f"data/processed/{split}.parquet"), df)
    prepare(update_params({"split": {"method": "random"}}))
    assert not read_parquet("data/processed/test.parquet").equals(first["test"])


def test_appending_rows_moves_no_existing_row(
    project_dir: Path, make_csv: Callable[..., Path]
) -> None:
    """What `nox -s retrain` does to the raw file: a row keeps its split forever."""
    params = load_params()
    prepare(params)
    before = _assignment()
    raw = Path(params.data.raw_path)
    extra = pd.read_csv(make_csv(project_dir / "more.csv", n_rows=300, seed=99))
    with raw.open("a") as fh:  # lines appended, the file's own lines untouched
        fh.write(extra.to_csv(header=False, index=False))
    prepare(params)
    after = _assignment()
    assert len(after) == len(before) + 300
    moved = [key for key, split in before.items() if after[key] != split]
    assert moved == []


def test_a_new_salt_re_splits_and_identical_rows_stay_together(
    project_dir: Path, update_params: Callable[..., Any]
) -> None:
    params = load_params()
    raw = Path(params.data.raw_path)
    df = pd.read_csv(raw)
    pd.concat([df, df.head(10).assign(label="positive")]).to_csv(raw, index=False)  # duplicates
    prepare(params)
    first = _assignment()
    assert len(first) == len(df), "identical feature values share one key, whatever the label"
    prepare(update_params({"split": {"salt": "another"}}))
    assert sum(first[k] != split for k, split in _assignment().items()) > len(first) // 4


def test_an_id_column_decides_the_split_and_is_no_feature(
    project_dir: Path, update_params: Callable[..., Any]
) -> None:
    params = load_params()
    raw = Path(params.data.raw_path)
    df = pd.read_csv(raw)
    df.insert(0, "customer", [f"c{i:04d}" for i in range(len(df))])
    df.to_csv(raw, index=False)
    schema = prepare(update_params({"split": {"id_column": "customer"}}))
    assert "customer" not in schema.features
    first = {s: len(f) for s, f in _splits().items()}
    df.loc[:, "feature_0"] = df["feature_0"] + 1.0  # every row corrected: none moves
    df.to_csv(raw, index=False)
    prepare(load_params())
    assert {s: len(f) for s, f in _splits().items()} == first
    df.loc[3, "customer"] = None
    df.to_csv(raw, index=False)
    with pytest.raises(DataError, match=r"1 rows have no value in split\.id_column 'customer'"):
        prepare(load_params())
    with pytest.raises(DataError, match=r"split\.id_column 'account' not found"):
        prepare(update_params({"split": {"id_column": "account"}}))


def test_main_writes_splits_and_schema(
    project_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([]) == 0
    schema = json.loads(Path("data/processed/schema.json").read_text())
    assert schema["features"] == FEATURES
    assert schema["target"] == "label"
    assert schema["classes"] == ["negative", "positive"]
    rows = schema["rows"]
    assert sum(rows.values()) == 120
    assert all(10 <= rows[name] <= 26 for name in ("val", "test")), rows  # 15% of 120, hashed
    assert schema["split"] == {
        "method": "hash",
        "salt": load_params().split.salt,
        "id_column": None,
    }
    assert len(schema["raw"]["md5"]) == 32
    counts = ", ".join(f"{name} {n}" for name, n in rows.items())
    assert counts in capsys.readouterr().out


def test_multiclass_integer_labels(
    project_dir: Path, make_csv: Callable[..., Path], update_params: Callable[..., Any]
) -> None:
    make_csv("data/raw/multi.csv", n_rows=200, n_classes=4, target="kind", labels=[3, 1, 10, 2])
    params = update_params({"data": {"raw_path": "data/raw/multi.csv", "target": "kind"}})
    schema = prepare(params)
    assert schema.classes == ["1", "10", "2", "3"]
    _, y, _ = load_split("train")
    assert set(np.unique(y)) == {0, 1, 2, 3}
    assert read_parquet("data/processed/val.parquet")["kind"].map(type).eq(str).all()


# --- what later stages load ----------------------------------------------------------------------


def test_load_split_dtypes_and_shapes(prepared_project: Path) -> None:
    x, y, schema = load_split("test")
    assert x.dtype == np.float32
    assert y.dtype == np.int64
    rows = json.loads(Path("data/processed/schema.json").read_text())["rows"]["test"]
    assert x.shape == (rows, 4)
    assert y.shape == (rows,)
    assert schema == Schema(
        features=FEATURES,
        target="label",
        classes=["negative", "positive"],
        kinds=dict.fromkeys(FEATURES, "numeric"),
    )
    df = read_parquet("data/processed/test.parquet")
    assert np.array_equal(x, df[FEATURES].to_numpy(np.float32))
    assert [schema.classes[i] for i in y] == df["label"].tolist()


def test_load_split_before_prepare(project_dir: Path) -> None:
    with pytest.raises(DataError, match=r"schema.json not found: run `dvc repro prepare`"):
        load_split("train")


def test_mixed_schema_records_kinds_and_the_train_vocabulary(
    mixed_project: Params, capsys: pytest.CaptureFixture[str]
) -> None:
    prepare(mixed_project)
    assert "(1 numeric, 1 boolean, 2 categorical)" in capsys.readouterr().out
    schema = json.loads(Path("data/processed/schema.json").read_text(encoding="utf-8"))
    assert schema["kinds"] == {
        "tenure": "numeric",
        "plan": "categorical",
        "country": "categorical",
        "auto_renew": "boolean",
    }
    assert schema["missing"] == "impute"
    train = read_parquet("data/processed/train.parquet")
    for column in ("plan", "country"):
        assert schema["categories"][column] == sorted(train[column].dropna().unique())
    assert "Équipe, 5 sièges" in schema["categories"]["plan"]
    assert str(train["auto_renew"].dtype) == "boolean"
    assert train.drop(columns="churned").isna().any().all(), "gaps are kept for the model"

    x, _, loaded = load_split("train")
    assert loaded.categories["plan"] == schema["categories"]["plan"]
    # Numbers first (gaps as NaN), then the codes: 0 for a gap, else vocabulary position + 1.
    plan_codes = x[:, 2]  # tenure, auto_renew, then plan and country
    expected = train["plan"].map(
        {label: i + 1 for i, label in enumerate(schema["categories"]["plan"])}
    )
    np.testing.assert_array_equal(plan_codes, expected.fillna(0).to_numpy(np.float32))
    assert np.isnan(x[:, 0]).sum() == train["tenure"].isna().sum()
