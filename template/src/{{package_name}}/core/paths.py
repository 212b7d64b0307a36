"""Every path and name the project's code shares, in one place: stages, the service, the monitor
and the tools read them from here, and ``dvc.yaml`` names the same files (a generated test holds
the two together).

Paths are relative to the project root, where DVC runs the stages and Nox runs the sessions.
"""

from __future__ import annotations

from pathlib import Path

# The import package (this module's top package) and the name of its model in MLflow's registry
# and in BentoML's store: the package's name with '-' for '_'.
PACKAGE = __package__.partition(".")[0] if __package__ else "<package>"
MODEL_NAME = PACKAGE.replace("_", "-")

PARAMS_FILE = Path("params.yaml")

# prepare: the split, typed data and the schema every later stage reads.
PROCESSED_DIR = Path("data/processed")
SCHEMA_FILE = "schema.json"  # inside PROCESSED_DIR
# Inside PROCESSED_DIR: each row's key (a hash of its id or feature values) and split. A model's
# run records the keys it trained on, so the gate can hold out rows no model has seen.
ROW_KEYS_FILE = "row_keys.parquet"
# An artefact of each training run: the keys of the rows it trained on (train and val splits).
SEEN_ROWS_ARTIFACT = "seen_rows.parquet"
SPLITS = ("train", "val", "test")

# train: the model artefact (the one file every consumer loads), its run record, its metrics.
WEIGHTS = "model.pt"  # the weights' file name, in models/, in MLflow's artefacts, in the Bento
MODEL_FILE = Path("models") / WEIGHTS
RUN_FILE = Path("models/run.json")  # the MLflow run and registered version of MODEL_FILE
TRAIN_METRICS = Path("metrics/train.json")
HISTORY_FILE = Path("metrics/history.csv")
CHECKPOINT_FILE = "last.pt"  # inside train.checkpoint_dir

# evaluate: test metrics, the gate's decision, plots.
EVAL_METRICS = Path("metrics/evaluate.json")
GATE_FILE = Path("metrics/gate.json")
SLICES_FILE = Path("metrics/slices.json")  # each slice's test metrics (evaluate.slices)
CONFUSION_FILE = Path("plots/confusion.csv")
CURVE_FILE = Path("plots/curve.csv")
# Mean |attribution| per original feature column on the test split (evaluation/attributions.py).
ATTRIBUTION_FILE = Path("plots/attributions.csv")  # the model just trained
ATTRIBUTION_CHAMPION_FILE = Path("plots/attributions_champion.csv")

# The MLflow store of a project without a tracking server: artefacts beside mlflow.db.
ARTIFACT_DIR = "mlartifacts"

# Serving: the prediction log (PREDICTION_LOG_DIR moves it), the models it names, the Bento.
PREDICTION_LOG_ENV = "PREDICTION_LOG_DIR"
PREDICTION_LOG_DIR = Path("logs/predictions")
LOGGED_MODELS_DIR = "models"  # inside the prediction log: each served version's test metrics
REQUEST_INDEX = "requests.sqlite"  # inside the prediction log: request id -> rows, for /feedback
DEPLOYMENT_FILE = "deployment.json"  # in the Bento: the served and shadow model tags
SOURCE_DIR = Path("src")
BUILD_DIR = Path("build")
SBOM_DIR = BUILD_DIR / "sbom"
IMAGE_ENV_FILE = BUILD_DIR / "image.env"
EXAMPLE_REQUEST = BUILD_DIR / "request.json"  # nox -s request: a ready /predict body

# Monitoring and continuous training.
REPORTS_DIR = Path("reports/monitoring")
RETRAIN_STATE = Path("data/retrain.json")
RETRAIN_REJECTS_DIR = Path("reports/retrain")  # labelled rows retrain refused, with the reasons
DVC_CACHE = Path(".dvc/cache/files/md5")


def module(name: str) -> str:
    """The dotted name of one of the package's modules, as ``python -m`` takes it."""
    return f"{PACKAGE}.{name}"
