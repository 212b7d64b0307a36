"""Demo traffic for a running service: test-split rows, optionally shifted, optionally labelled.

``python -m <package>.simulate --url URL --rows N [--drift D] [--seed S] [--feedback]
[--flip-labels P] [--batch B]`` (``nox -s simulate -- ...``), from the project root.

Rows are drawn from the prepared test split (without replacement while it lasts). ``--drift D``
shifts the features at even positions of data/processed/schema.json's feature list (the 1st,
3rd, 5th, ...): numbers by D standard deviations of the train split, and categories and
true/false values replaced, with probability min(D, 1), by the train split's rarest value.
``--feedback`` then posts each request's true classes to ``/feedback``; ``--flip-labels P`` posts
a wrong class for a share P of them instead (a model whose quality "fell", for the monitor).
``SERVICE_API_TOKEN`` (``SERVICE_FEEDBACK_TOKEN`` for ``/feedback``) is sent as the bearer
token when set.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np
import pandas as pd

from ..core.config import ProjectError, cli_errors
from ..core.features import BOOLEAN, NUMERIC
from ..data.prepare import Schema, load_frame
from ..serving.deploy import post


def shifted_features(schema: Schema) -> list[str]:
    """The features ``--drift`` moves: every other one, starting with the first."""
    return schema.features[::2]


def draw(test: pd.DataFrame, rows: int, rng: np.random.Generator) -> pd.DataFrame:
    """``rows`` rows of ``test``: each once, in random order, before any repeats."""
    order = np.concatenate([rng.permutation(len(test)) for _ in range(-(-rows // len(test)))])
    return test.iloc[order[:rows]].reset_index(drop=True)


def shift(
    frame: pd.DataFrame, train: pd.DataFrame, schema: Schema, drift: float, rng: np.random.Generator
) -> pd.DataFrame:
    """The rows with :func:`shifted_features` moved by ``drift`` (see the module's docstring)."""
    out = frame.copy()
    if drift == 0:
        return out
    for name in shifted_features(schema):
        kind = schema.spec.kinds[name]
        if kind == NUMERIC:
            std = float(train[name].std()) or 1.0
            out[name] = out[name] + drift * std
        else:
            counts = train[name].dropna().value_counts()
            if counts.empty:
                continue
            hit = rng.random(len(out)) < min(drift, 1.0)
            rare = counts.index[-1]
            column = out[name].astype(object)
            column[hit] = bool(rare) if kind == BOOLEAN else rare
            out[name] = column
    return out


def flip(labels: list[str], classes: list[str], share: float, rng: np.random.Generator) -> list:
    """``labels`` with a share of them replaced by another class."""
    out = list(labels)
    for i in np.flatnonzero(rng.random(len(out)) < share):
        others = [c for c in classes if c != out[i]]
        out[i] = others[int(rng.integers(len(others)))]
    return out


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    """deploy's JSON client, with the route's bearer token (SERVICE_FEEDBACK_TOKEN for
    /feedback, else SERVICE_API_TOKEN); a service that does not answer: one line."""
    name = "SERVICE_FEEDBACK_TOKEN" if url.endswith("/feedback") else "SERVICE_API_TOKEN"
    token = os.environ.get(name)
    try:
        return post(url, body, {"Authorization": f"Bearer {token}"} if token else None)
    except OSError as exc:
        raise ProjectError(
            f"cannot reach {url} ({exc}): start the service (`nox -s serve`) or fix --url"
        ) from None


def _json_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(frame.to_json(orient="records"))


def simulate(
    url: str, rows: int, drift: float, seed: int, feedback: bool, flip_share: float, batch: int
) -> dict[str, Any]:
    """Send the traffic; a summary of what was sent."""
    rng = np.random.default_rng(seed)
    test, schema = load_frame("test")
    train, _ = load_frame("train")
    sample = draw(test, rows, rng)
    features = shift(sample[schema.features], train, schema, drift, rng)
    truth = sample[schema.target].astype(str).tolist()
    sent = labelled = 0
    versions: set[str] = set()
    for start in range(0, rows, batch):
        chunk = features.iloc[start : start + batch]
        status, body, headers = _post(f"{url}/predict", {"rows": _json_rows(chunk)})
        if status != 200:
            raise ProjectError(f"/predict answered {status}: {body.get('error', body)}")
        sent += len(chunk)
        versions.add(str(body["model_version"]))
        if feedback:
            labels = flip(truth[start : start + batch], schema.classes, flip_share, rng)
            request_id = {k.lower(): v for k, v in headers.items()}["x-request-id"]
            status, body, _ = _post(f"{url}/feedback", {"request_id": request_id, "labels": labels})
            if status != 200:
                raise ProjectError(f"/feedback answered {status}: {body.get('error', body)}")
            labelled += len(labels)
    return {
        "rows": sent,
        "requests": -(-sent // batch),
        "labelled": labelled,
        "model_versions": sorted(versions),
        "shifted": shifted_features(schema) if drift else [],
    }


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the running service")
    parser.add_argument("--rows", type=int, default=200, help="rows to send (default 200)")
    parser.add_argument("--drift", type=float, default=0.0, help="shift, in train std (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--feedback", action="store_true", help="post the true classes")
    parser.add_argument(
        "--flip-labels",
        type=float,
        default=0.0,
        metavar="P",
        help="with --feedback: a share P of wrong classes",
    )
    parser.add_argument("--batch", type=int, default=8, help="rows per request (default 8)")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.batch < 1:
        parser.error("--rows and --batch must be positive")
    if args.drift < 0 or not 0 <= args.flip_labels <= 1:
        parser.error("--drift must be >= 0 and --flip-labels between 0 and 1")
    url = args.url.rstrip("/")
    summary = simulate(
        url, args.rows, args.drift, args.seed, args.feedback, args.flip_labels, args.batch
    )
    shifted = ", ".join(summary["shifted"][:6]) + (", ..." if len(summary["shifted"]) > 6 else "")
    print(
        f"sent {summary['rows']} rows in {summary['requests']} requests to {url} "
        f"(model v{', v'.join(summary['model_versions'])}); "
        + (f"drift {args.drift:g} std on {shifted}; " if args.drift else "no drift; ")
        + (
            f"feedback on {summary['labelled']} rows ({args.flip_labels:.0%} flipped)"
            if args.feedback
            else "no feedback"
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
