"""Score a Parquet dataset on Spark with the registered model: the same answers as `nox -s predict`.

For data beyond one machine. The registered model is an MLflow pyfunc; ``mlflow.pyfunc.spark_udf``
ships it to every executor, which scores its partitions in Arrow batches through the model's own
code (the ``predict_frame`` of the batch scorer and the service). Needs ``pyspark`` (and Java 17+)
in an environment that also has this project's dependencies; on a cluster, the executors need
them too (or pass ``env_manager="uv"`` / ``"virtualenv"`` to let MLflow build them). Locally:

    uv pip install "pyspark>=4,<5"        # not a project dependency: a Spark cluster brings its own
    python examples/spark_predict.py --input data/processed/test.parquet --output spark-out.parquet

Output: the ``--keep`` columns (default: all), ``label``, one probability column per class, and
``model_version``, as ``nox -s predict`` writes them.
"""

from __future__ import annotations

import argparse
import os
import sys

import mlflow
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from my_ml_project.core.config import load_params
from my_ml_project.registry.store import CHAMPION, get_alias_version, tracking_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="Parquet file or folder (any Spark URI)")
    parser.add_argument("--output", required=True, help="Parquet folder to write")
    parser.add_argument("--alias", default=CHAMPION, help="registered model alias")
    parser.add_argument("--keep", nargs="+", help="input columns to copy (default: all)")
    parser.add_argument("--master", default="local[*]", help="Spark master URL")
    args = parser.parse_args()

    params = load_params().mlflow
    mlflow.set_tracking_uri(tracking_uri(params))
    version = get_alias_version(params.model_name, args.alias)
    if version is None:
        raise SystemExit(f"error: model '{params.model_name}' has no alias '{args.alias}'")
    # Local workers run this interpreter (else the first `python3` on PATH, without the model's
    # packages); on a cluster, PYSPARK_PYTHON names the executors' Python.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = SparkSession.builder.master(args.master).appName("batch-scoring").getOrCreate()
    # env_manager="local": the executors use this Python environment (it has the model's needs).
    # The result type is the model signature's output: label, then one column per class.
    predict = mlflow.pyfunc.spark_udf(
        spark, f"models:/{params.model_name}/{version}", env_manager="local"
    )
    rows = spark.read.parquet(args.input)
    features = [F.col(f"`{name}`") for name in predict.metadata.get_input_schema().input_names()]
    kept = rows.columns if args.keep is None else args.keep
    scored = rows.withColumn("_answer", predict(F.struct(*features))).select(
        *[F.col(f"`{name}`") for name in kept],
        "_answer.*",
        F.lit(str(version)).alias("model_version"),
    )
    scored.write.mode("overwrite").parquet(args.output)
    spark.stop()


if __name__ == "__main__":
    main()
