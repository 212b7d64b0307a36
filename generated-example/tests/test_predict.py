"""Batch scoring (predict.py) on a model made in the test: predict_frame's answers in any
chunking, rejected rows reported with number and reason, output written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from my_ml_project.core.fileio import read_parquet
from my_ml_project.model.network import TabularClassifier, predict_frame, save_model
from my_ml_project.serving import batch as predict

FEATURES = ["size", "plan", "renew"]


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = TabularClassifier(
        FEATURES,
        ["no", "yes", "maybe"],
        hidden_sizes=[8],
        kinds={"size": "numeric", "plan": "categorical", "renew": "boolean"},
        categories={"plan": ["basic", "pro"]},
    )
    path = tmp_path / "model.pt"
    save_model(model.eval(), path)
    return path


def rows(n: int = 50, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "id": np.arange(n),
            "size": rng.normal(size=n),
            "plan": rng.choice(["basic", "pro", "unknown"], n),
            "renew": rng.choice(["yes", "no"], n),
            "note": "extra column",
        }
    )


def score(model_file: Path, source: Path, output: Path, *args: str) -> int:
    argv = ["--input", str(source), "--output", str(output), "--model-file", str(model_file)]
    return predict.main([*argv, "--no-progress", *args])


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_output_is_predict_frame_in_any_chunking(model_file: Path, tmp_path: Path, suffix: str):
    frame = rows()
    source = tmp_path / f"in{suffix}"
    frame.to_parquet(source) if suffix == ".parquet" else frame.to_csv(source, index=False)
    read = read_parquet if suffix == ".parquet" else pd.read_csv
    assert score(model_file, source, tmp_path / f"one{suffix}") == 0
    assert score(model_file, source, tmp_path / f"many{suffix}", "--chunk-rows", "7") == 0
    one, many = read(tmp_path / f"one{suffix}"), read(tmp_path / f"many{suffix}")
    pd.testing.assert_frame_equal(one, many)

    expected = predict_frame(predict.load_model(model_file), frame)
    assert list(one.columns) == [*frame.columns, "label", "no", "yes", "maybe", "model_version"]
    assert one["label"].tolist() == expected["label"].tolist()
    np.testing.assert_allclose(one[["no", "yes", "maybe"]], expected[["no", "yes", "maybe"]])
    assert set(one["model_version"]) == {f"file:{model_file}"}
    assert one["id"].tolist() == frame["id"].tolist()


def test_bad_rows_go_to_the_rejects_file_with_number_and_reason(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = rows(20).astype({"size": object})
    frame.loc[3, "size"] = "large"
    frame.loc[11, "renew"] = None
    source, output = tmp_path / "in.csv", tmp_path / "out.parquet"
    frame.to_csv(source, index=False)

    assert score(model_file, source, output, "--keep", "id", "--chunk-rows", "8") == 1
    out = capsys.readouterr()
    assert "18 rows scored" in out.out
    assert "2 rows rejected" in out.err
    rejects = pd.read_csv(tmp_path / "out.parquet.rejects.csv")
    assert rejects["row"].tolist() == [4, 12]  # 1 = the first data row
    assert rejects["id"].tolist() == [3, 11]
    assert "size" in rejects["reason"][0]
    assert "renew: missing value" in rejects["reason"][1]
    scored = read_parquet(output)
    assert scored["id"].tolist() == [i for i in range(20) if i not in (3, 11)]
    assert list(scored.columns) == ["id", "label", "no", "yes", "maybe", "model_version"]

    assert score(model_file, source, output, "--keep", "id", "--allow-rejects") == 0


def test_clean_input_leaves_no_rejects_file_and_no_progress_noise(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, output = tmp_path / "in.csv", tmp_path / "out.csv"
    rows(20).to_csv(source, index=False)
    stale = tmp_path / "out.csv.rejects.csv"
    stale.write_text("row,reason\n4,from an earlier run\n")
    argv = ["--input", str(source), "--output", str(output), "--model-file", str(model_file)]
    assert predict.main(argv) == 0  # progress left on: stderr is no terminal here
    out = capsys.readouterr()
    assert "20 rows scored" in out.out
    assert "none rejected" in out.out
    assert out.err == ""
    assert not stale.exists()


def test_unusable_input_is_one_error_line(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    absent = tmp_path / "absent.csv"
    assert score(model_file, absent, tmp_path / "out.csv") == 2
    assert capsys.readouterr().err == f"error: input file {absent} not found\n"

    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet")
    assert score(model_file, garbage, tmp_path / "out.csv") == 2
    assert capsys.readouterr().err.startswith(f"error: cannot read {garbage}")

    lacking = tmp_path / "lacking.csv"
    rows().drop(columns=["plan"]).to_csv(lacking, index=False)
    assert score(model_file, lacking, tmp_path / "out.csv") == 2
    assert "lacks 1 of the model's 3 feature columns: plan" in capsys.readouterr().err
    assert not (tmp_path / "out.csv").exists()


def test_a_crash_midway_leaves_the_old_output_untouched(
    model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, output = tmp_path / "in.parquet", tmp_path / "out.parquet"
    rows().to_parquet(source)
    output.write_bytes(b"previous output")
    calls = 0
    real = predict.score_chunk

    def crash_on_the_third_chunk(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 4:  # the first call scores an empty chunk (the output's columns)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(predict, "score_chunk", crash_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        score(model_file, source, output, "--chunk-rows", "10")
    assert output.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "model.pt", "out.parquet"]
