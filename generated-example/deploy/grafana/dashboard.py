# /// script
# requires-python = ">=3.11"
# dependencies = ["grafana-foundation-sdk==1769699998!10.1.0"]
# ///
"""The model server's Grafana dashboard, built with Grafana's foundation SDK.

``uv run deploy/grafana/dashboard.py > deploy/grafana/dashboard.json`` writes what Grafana
imports (Dashboards > New > Import). Panels: requests by status, failed share (5xx, 429), latency
percentiles, rows per model call (batches), the prediction log's rows written, dropped and
failed writes, the model version each namespace serves, and the monitor's verdict. The metrics
are the service's /metrics (src/*/service.py) and the monitor's (src/*/monitor_export.py).
"""

from __future__ import annotations

import json

from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
NS = 'namespace=~"$namespace"'
PREDICT = f'endpoint="/predict", {NS}'
FAILED = f'{PREDICT}, http_response_code=~"5..|429"'
WINDOW = "[$__rate_interval]"


def query(expr: str, legend: str = "__auto") -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend)


def rate(metric: str, labels: str = NS) -> str:
    return f"rate({metric}{{{labels}}}{WINDOW})"


def outcome(name: str) -> str:
    """The namespace matcher and one outcome of the prediction log's counter."""
    return NS + ', outcome="' + name + '"'


def quantile(q: float, metric: str, labels: str) -> str:
    return f"histogram_quantile({q}, sum by (le) ({rate(metric + '_bucket', labels)}))"


def mean(histogram: str) -> str:
    return f"sum({rate(histogram + '_sum')}) / sum({rate(histogram + '_count')})"


def timeseries(title: str, unit: str, *targets: Dataquery) -> Timeseries:
    panel = Timeseries().title(title).unit(unit).datasource(DATASOURCE).height(8).span(8)
    for target in targets:
        panel = panel.with_target(target)
    return panel


def build() -> Dashboard:
    requests = "bentoml_service_request_total"
    duration = "bentoml_service_request_duration_seconds"
    return (
        Dashboard("Model server")
        .uid("model-server")
        .tags(["mlops", "model-server"])
        .refresh("30s")
        .time("now-6h", "now")
        .with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(
            QueryVariable("namespace")
            .label("Namespace")
            .datasource(DATASOURCE)
            .query("label_values(model_info, namespace)")
            .multi(True)
            .include_all(True)
        )
        .with_row(Row("Traffic"))
        .with_panel(
            timeseries(
                "Requests by status",
                "reqps",
                query(
                    f"sum by (http_response_code) ({rate(requests, PREDICT)})",
                    "{{http_response_code}}",
                ),
            )
        )
        .with_panel(
            timeseries(
                "Errors (5xx and 429 share of /predict)",
                "percentunit",
                query(
                    f"sum({rate(requests, FAILED)}) / sum({rate(requests, PREDICT)})",
                    "failed share",
                ),
            )
        )
        .with_panel(
            timeseries(
                "Latency percentiles (/predict)",
                "s",
                *(
                    query(quantile(q, duration, PREDICT), f"p{round(q * 100)}")
                    for q in (0.5, 0.9, 0.99)
                ),
            )
        )
        .with_row(Row("Model"))
        .with_panel(
            timeseries(
                "Rows per model call (batches)",
                "short",
                query(quantile(0.5, "model_rows_per_call", NS), "p50"),
                query(quantile(0.99, "model_rows_per_call", NS), "p99"),
                query(f"{mean('model_rows_per_call')}", "mean"),
            )
        )
        .with_panel(
            Stat()
            .title("Model version serving")
            .description("Registry version of the model each namespace serves (value: workers)")
            .datasource(DATASOURCE)
            .height(8)
            .span(8)
            .with_target(
                query(
                    f"count by (namespace, model_version) (model_info{{{NS}}})",
                    "{{namespace}}: v{{model_version}}",
                )
            )
        )
        .with_panel(
            Stat()
            .title("Monitor verdict")
            .description("The latest `nox -s monitor` verdict, pushed by `nox -s monitor-export`")
            .datasource(DATASOURCE)
            .height(8)
            .span(8)
            .with_target(
                query(
                    "max by (service, status) (model_monitor_status) == 1",
                    "{{service}}: {{status}}",
                )
            )
        )
        .with_row(Row("Prediction log"))
        .with_panel(
            timeseries(
                "Prediction log: lines written, dropped, rejected; failed writes (retried)",
                "short",
                *(
                    query(f"sum({rate('prediction_log_lines_total', outcome(o))})", f"{o}/s")
                    for o in ("written", "dropped", "rejected", "write_errors")
                ),
            )
        )
    )


def main() -> None:
    print(json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
