"""Batch scoring: a CSV or Parquet file of raw rows in, labels and class probabilities out.

``python -m <package>.predict --input FILE --output FILE [--version N | --alias A | --model-file
PATH] [--keep COL ...] [--rejects FILE] [--allow-rejects]`` (or ``nox -s predict -- ...``).

The file is read in chunks (Parquet row batches, CSV chunks), so memory stays bounded whatever
its size; each chunk is scored through :func:`.model.predict_frame`, the path the MLflow pyfunc
and the service take, so every door answers a row alike. The output holds the kept columns (all
input columns by default), ``label``, one probability column per class and ``model_version``;
it is written to a temporary file renamed at the end: a crash leaves no half-written output.

Rows that cannot be scored (a gap in a model trained without imputation, text in a numeric
column) go to the rejects file (``<output>.rejects.csv`` by default) with their row number
(1 = the first data row) and the reason; the command then exits 1 unless ``--allow-rejects``.
A file without the model's columns, or one that cannot be read, is one ``error:`` line (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .config import ProjectError, cli_errors, load_params
from .fileio import atomic_path
from .model import ModelInputError, TabularClassifier, load_model, predict_frame

CHUNK_ROWS = 65_536
VERSION_COLUMN = "model_version"
REJECT_COLUMNS = ("row", "reason")
PARQUET, CSV = "parquet", "csv"
FORMATS = {".parquet": PARQUET, ".pq": PARQUET, ".csv": CSV}
REJECTS_EXIT = 1
# What reading a damaged or foreign file raises (pandas' ParserError is a ValueError).
READ_ERRORS = (OSError, ValueError, pa.ArrowException, UnicodeDecodeError)


@dataclass
class Counts:
    scored: int = 0
    rejected: int = 0


def file_format(path: Path) -> str:
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise ProjectError(
            f"{path}: unknown file type '{path.suffix}' (use .csv or .parquet)"
        ) from None


def read_chunks(path: Path, chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """The rows of a CSV or Parquet file, ``chunk_rows`` at a time, indexed by row number from 1."""
    start = 1
    if file_format(path) == PARQUET:
        batches = (b.to_pandas() for b in pq.ParquetFile(path).iter_batches(chunk_rows))
    else:
        batches = pd.read_csv(path, chunksize=chunk_rows)
    for chunk in batches:
        chunk.index = pd.RangeIndex(start, start + len(chunk), name="row")
        start += len(chunk)
        yield chunk


def row_count(path: Path) -> int | None:
    """Rows in the file, when known without reading it (Parquet's footer), for the progress bar."""
    return pq.ParquetFile(path).metadata.num_rows if file_format(path) == PARQUET else None


def score_chunk(
    model: TabularClassifier, chunk: pd.DataFrame, keep: Sequence[str] | None, version: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scored rows, rejected rows) of one chunk. The common case is one call on the whole
    chunk; only a chunk the model refuses is checked row by row, and its good rows scored."""
    try:
        answers = predict_frame(model, chunk)
        rejects = chunk.iloc[:0]
        reasons = np.array([], dtype=object)
    except ModelInputError:
        reasons_all = model.spec.row_errors(chunk)  # raises for missing columns: every row
        bad = pd.notna(reasons_all)
        rejects, reasons = chunk[bad], reasons_all[bad]
        chunk = chunk[~bad]
        answers = predict_frame(model, chunk)
    scored = pd.concat([_kept(chunk, keep), answers.reset_index(drop=True)], axis=1)
    scored[VERSION_COLUMN] = version
    why = pd.DataFrame({"row": rejects.index.to_numpy(), "reason": reasons})
    return scored, pd.concat([why, _kept(rejects, keep)], axis=1)


def _kept(frame: pd.DataFrame, keep: Sequence[str] | None) -> pd.DataFrame:
    return (frame if keep is None else frame[list(keep)]).reset_index(drop=True)


class ChunkWriter:
    """Appends frames to one CSV or Parquet file (the schema is the first frame's)."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.format = path, fmt
        self._parquet: pq.ParquetWriter | None = None
        self._csv: Any = None

    def write(self, frame: pd.DataFrame) -> None:
        if self.format == CSV:
            first = self._csv is None
            if first:
                self._csv = open(self.path, "w", encoding="utf-8", newline="")  # noqa: SIM115
            frame.to_csv(self._csv, header=first, index=False)
            return
        if self._parquet is None:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            self._parquet = pq.ParquetWriter(self.path, table.schema)
        else:
            try:
                table = pa.Table.from_pandas(
                    frame, schema=self._parquet.schema, preserve_index=False
                )
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise ProjectError(f"a column changed type between chunks: {exc}") from None
        self._parquet.write_table(table)

    def close(self, empty: pd.DataFrame) -> None:
        """Finish the file; with nothing written, an empty one with ``empty``'s columns."""
        if self._parquet is None and self._csv is None:
            self.write(empty)
        if self._parquet is not None:
            self._parquet.close()
        if self._csv is not None:
            self._csv.close()


def _check_columns(model: TabularClassifier, chunk: pd.DataFrame, keep: Sequence[str] | None):
    outputs = {"label", VERSION_COLUMN, *model.class_names}
    kept = chunk.columns if keep is None else keep
    absent = [c for c in keep or () if c not in chunk.columns]
    if absent:
        raise ProjectError(f"--keep names columns the input lacks: {', '.join(absent)}")
    clash = sorted(outputs & {str(c) for c in kept})
    if clash:
        raise ProjectError(
            f"input columns {clash} would clash with the output's: keep others with --keep"
        )
    model.spec.row_errors(chunk.iloc[:0])  # missing feature columns: one clear error


def score_file(
    model: TabularClassifier,
    version: str,
    source: Path,
    output: Path,
    rejects_path: Path,
    *,
    keep: Sequence[str] | None = None,
    chunk_rows: int = CHUNK_ROWS,
    progress: bool = True,
) -> Counts:
    """Score ``source`` into ``output`` and ``rejects_path`` (both written atomically)."""
    from tqdm import tqdm

    if not source.is_file():
        raise ProjectError(f"input file {source} not found")
    counts = Counts()
    with atomic_path(output) as tmp_out, atomic_path(rejects_path) as tmp_rej:
        out, rej = ChunkWriter(tmp_out, file_format(output)), ChunkWriter(tmp_rej, CSV)
        try:
            total = row_count(source)
        except READ_ERRORS as exc:
            raise _unreadable(source, exc) from None
        bar = tqdm(total=total, unit="rows", disable=not progress, file=sys.stderr)
        try:
            empty_out = empty_rej = None
            for chunk in _readable(read_chunks(source, chunk_rows), source):
                if empty_out is None:
                    _check_columns(model, chunk, keep)
                    empty_out, empty_rej = score_chunk(model, chunk.iloc[:0], keep, version)
                scored, rejected = score_chunk(model, chunk, keep, version)
                out.write(scored)
                if len(rejected):
                    rej.write(rejected)
                counts.scored += len(scored)
                counts.rejected += len(rejected)
                bar.update(len(chunk))
            if empty_out is None:
                raise ProjectError(f"{source} has no rows")
        finally:
            bar.close()
            out.close(empty_out if empty_out is not None else pd.DataFrame())
            rej.close(empty_rej if empty_rej is not None else pd.DataFrame(columns=REJECT_COLUMNS))
    return counts


def _readable(chunks: Iterator[pd.DataFrame], source: Path) -> Iterator[pd.DataFrame]:
    """The chunks, a file that cannot be read (mid-way too) turned into one clear error."""
    try:
        yield from chunks
    except READ_ERRORS as exc:
        raise _unreadable(source, exc) from None


def _unreadable(source: Path, exc: Exception) -> ProjectError:
    text = str(exc).strip()
    return ProjectError(f"cannot read {source}: {text.splitlines()[0] if text else repr(exc)}")


def load_scoring_model(
    version: str | None, alias: str | None, model_file: Path | None
) -> tuple[TabularClassifier, str]:
    """The model and the version to record: a file, or a registered version (by number or
    alias), read as ``model.pt`` without ``mlflow.pytorch``."""
    if model_file is not None:
        return load_model(model_file), f"file:{model_file}"
    from . import registry

    params = load_params().mlflow
    registry.configure(params)
    if version is None:
        alias = alias or registry.CHAMPION
        version = registry.get_alias_version(params.model_name, alias)
        if version is None:
            raise ProjectError(f"model '{params.model_name}' has no alias '{alias}': train first")
    elif not registry.version_exists(params.model_name, version):
        raise ProjectError(f"model '{params.model_name}' has no version {version}")
    return registry.load_version(params.model_name, version), str(version)


def _device(model: TabularClassifier) -> TabularClassifier:
    import torch

    return model.to("cuda") if torch.cuda.is_available() else model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="predict", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path, help="CSV or Parquet of raw rows")
    parser.add_argument("--output", required=True, type=Path, help=".csv or .parquet to write")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", help="registered model version")
    which.add_argument("--alias", help="registered model alias (default: champion)")
    which.add_argument("--model-file", type=Path, help="a model.pt instead of the registry")
    parser.add_argument("--keep", nargs="+", help="input columns to copy (default: all)")
    parser.add_argument("--rejects", type=Path, help="default: <output>.rejects.csv")
    parser.add_argument("--allow-rejects", action="store_true", help="exit 0 despite rejects")
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help="rows per chunk")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.chunk_rows < 1:
        parser.error("--chunk-rows must be >= 1")
    return args


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for path in (args.input, args.output):
        file_format(path)
    if not args.input.is_file():
        raise ProjectError(f"input file {args.input} not found")
    rejects = args.rejects or args.output.with_name(f"{args.output.name}.rejects.csv")
    model, version = load_scoring_model(args.version, args.alias, args.model_file)
    counts = score_file(
        _device(model),
        version,
        args.input,
        args.output,
        rejects,
        keep=args.keep,
        chunk_rows=args.chunk_rows,
        progress=not args.no_progress,
    )
    print(
        f"model version {version}: {counts.scored} rows scored -> {args.output}, "
        f"{counts.rejected} rejected -> {rejects}"
    )
    if counts.rejected and not args.allow_rejects:
        print(
            f"error: {counts.rejected} rows rejected (see {rejects}); --allow-rejects to accept",
            file=sys.stderr,
        )
        return REJECTS_EXIT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
