"""Build the monitoring profile's Grafana dashboard (``deploy/grafana/dashboards/mecs.json``).

The dashboard is made with Grafana's own typed builders (``grafana-foundation-sdk``,
generated from Grafana's dashboard schema), so every field is one the schema knows.
``python deploy/grafana/dashboard.py`` rewrites the JSON; ``tests/test_deploy.py``
checks that the committed file is what this builds and that it loads back through
the schema's model unchanged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUT = Path(__file__).parent / "dashboards" / "mecs.json"
# the provisioned Prometheus data source (provisioning/datasources/prometheus.yml)
SOURCE = DataSourceRef(type_val="prometheus", uid="mecs-prometheus")


def _query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(SOURCE)


def _series(title: str, unit: str, *queries, description: str = "") -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).datasource(SOURCE).height(8).span(12)
    if description:
        panel = panel.description(description)
    for q in queries:
        panel = panel.with_target(q)
    return panel


def build() -> dict:
    """The dashboard as JSON-ready data."""
    rate = "[5m]"
    d = (
        dashboard.Dashboard("mecs: served corrections")
        .uid("mecs-service")
        .tags(["mecs"])
        .refresh("30s")
        .time("now-6h", "now")
        .with_row(dashboard.Row("Service"))
        .with_panel(
            _series(
                "Infer latency in the server (p50, p99)",
                "s",
                _query(
                    "histogram_quantile(0.5, sum by (le, model) "
                    f"(rate(mecs_inference_duration_seconds_bucket{rate})))",
                    "p50 {{model}}",
                ),
                _query(
                    "histogram_quantile(0.99, sum by (le, model) "
                    f"(rate(mecs_inference_duration_seconds_bucket{rate})))",
                    "p99 {{model}}",
                    "B",
                ),
            )
        )
        .with_panel(
            _series(
                "Samples per forward pass (mean)",
                "short",
                _query(
                    f"sum by (model) (rate(mecs_batch_size_sum{rate})) / "
                    f"sum by (model) (rate(mecs_batch_size_count{rate}))",
                    "{{model}}",
                ),
                description="the batcher's batch sizes; timestep groups fill whole batches",
            )
        )
        .with_panel(
            _series(
                "Requests by version and stage",
                "reqps",
                _query(
                    "sum by (model, version) (rate(mecs_inference_requests_total"
                    f'{{status="200"}}{rate})) * on (model, version) group_left (stage) '
                    "mecs_model_version_stage",
                    "{{model}} v{{version}} ({{stage}})",
                ),
            )
        )
        .with_panel(
            stat.Panel()
            .title("Version served by default")
            .datasource(SOURCE)
            .height(8)
            .span(12)
            .with_target(_query("mecs_model_version_served", "{{model}}"))
        )
        .with_row(dashboard.Row("Skill"))
        .with_panel(
            _series(
                "Out-of-distribution rate",
                "percentunit",
                _query(
                    f"sum by (model) (rate(mecs_out_of_distribution_samples_total{rate})) / "
                    f"sum by (model) (rate(mecs_inference_samples_total{rate}))",
                    "served {{model}}",
                ),
                _query("mecs_monitor_ood_rate", "recorded {{model}}", "B"),
            )
        )
        .with_panel(
            _series(
                "Increment reduction of the served corrections (mecs monitor)",
                "percentunit",
                _query(
                    "mecs_monitor_increment_reduction",
                    "{{model}} v{{version}} ({{stage}}) {{field}}",
                ),
                _query("mecs_monitor_skill_alert", "alert {{model}} v{{version}} {{field}}", "B"),
                description="1 - RMS(analysis - corrected forecast) / RMS(analysis - "
                "uncorrected forecast); an alert is 1 below the monitor's threshold",
            )
        )
        .with_panel(
            _series(
                "Shadow candidate: distance from production (median)",
                "short",
                _query(
                    "histogram_quantile(0.5, sum by (le, model, candidate, field) "
                    f"(rate(mecs_shadow_difference_bucket{rate})))",
                    "{{model}} candidate v{{candidate}} {{field}}",
                ),
                description="RMS difference of the candidate's corrections from "
                "production's, in training-target standard deviations",
            )
        )
    )
    return json.loads(json.dumps(d.build(), cls=JSONEncoder))


def main() -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(build(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
