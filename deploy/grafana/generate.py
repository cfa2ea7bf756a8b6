#!/usr/bin/env python3
"""Writes modelgate.json, the Grafana dashboard (standard library only).

    python3 deploy/grafana/generate.py

Every expression is run against a real Prometheus scraping a real modelgate by
tests/it/prometheus.rs, so a typo in a metric or label name fails the tests.
"""
import json
from pathlib import Path

CLIENT = 'variant!="shadow"'
PANELS = [
    ("Requests per second by model and variant", "timeseries", "reqps",
     [f'sum by (model, variant) (rate(modelgate_requests_total{{model=~"$model"}}[1m]))']),
    ("Error rate (server-side)", "timeseries", "percentunit",
     [f'sum by (model) (rate(modelgate_requests_total{{{CLIENT}, model=~"$model", code=~"inference_failed|internal|unavailable|deadline_exceeded|overloaded"}}[5m])) / sum by (model) (rate(modelgate_requests_total{{{CLIENT}, model=~"$model"}}[5m]))']),
    ("Latency p50 / p99", "timeseries", "s",
     [f'histogram_quantile(0.5, sum by (model, le) (rate(modelgate_request_duration_seconds_bucket{{{CLIENT}, model=~"$model"}}[5m])))',
      f'histogram_quantile(0.99, sum by (model, le) (rate(modelgate_request_duration_seconds_bucket{{{CLIENT}, model=~"$model"}}[5m])))']),
    ("Queue wait p99", "timeseries", "s",
     ['histogram_quantile(0.99, sum by (model, le) (rate(modelgate_queue_duration_seconds_bucket{model=~"$model"}[5m])))']),
    ("Batch size (rows, mean)", "timeseries", "short",
     ['sum by (model) (rate(modelgate_batch_size_rows_sum{model=~"$model"}[5m])) / sum by (model) (rate(modelgate_batch_size_rows_count{model=~"$model"}[5m]))']),
    ("Canary weight", "timeseries", "percent",
     ['modelgate_traffic_canary_weight_percent{model=~"$model"}']),
    ("Rollout step", "stat", "short", ['modelgate_rollout_step{model=~"$model"}']),
    ("Shadow disagreement", "timeseries", "percentunit",
     ['sum by (model, version) (rate(modelgate_compare_disagreed_rows_total{model=~"$model"}[5m])) / sum by (model, version) (rate(modelgate_compare_rows_total{model=~"$model"}[5m]))']),
    ("Mirrors shed per second", "timeseries", "short",
     ['sum by (model, reason) (rate(modelgate_mirror_shed_total{model=~"$model"}[5m]))']),
    ("Drift score (PSI / KS / chi2)", "timeseries", "short",
     ['modelgate_drift_score{model=~"$model"}']),
    ("Drift state (0 OK, 1 WARN, 2 DRIFT)", "stat", "short",
     ['modelgate_drift_state{model=~"$model"}']),
    ("Webhook backlog", "timeseries", "short", ["modelgate_webhook_backlog"]),
    ("Versions ready", "stat", "short", ['modelgate_model_versions_ready{model=~"$model"}']),
    ("Accuracy on labelled traffic (last window, cumulative)", "timeseries", "percentunit",
     ['modelgate_quality_window_accuracy{model=~"$model"}',
      'modelgate_quality_accuracy{model=~"$model"}']),
    ("Mean absolute error on labelled traffic", "timeseries", "short",
     ['modelgate_quality_mae{model=~"$model"}']),
    ("Quality state (0 OK, 1 DEGRADED)", "stat", "short",
     ['modelgate_quality_state{model=~"$model"}']),
    ("Feedback per second by outcome", "timeseries", "short",
     ['sum by (model, outcome) (rate(modelgate_feedback_total{model=~"$model"}[5m]))']),
    ("Capture: records and drops per second", "timeseries", "short",
     ['sum by (model) (rate(modelgate_capture_records_total{model=~"$model"}[5m]))',
      'sum by (model, reason) (rate(modelgate_capture_dropped_total{model=~"$model"}[5m]))']),
    ("Capture: bytes written per second, files open", "timeseries", "Bps",
     ['sum by (model) (rate(modelgate_capture_bytes_written_total{model=~"$model"}[5m]))',
      'modelgate_capture_files_open']),
]


def panel(i, title, kind, unit, exprs):
    return {
        "id": i + 1,
        "title": title,
        "type": kind,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(65 + j), "expr": e, "datasource": {"type": "prometheus", "uid": "${datasource}"}}
            for j, e in enumerate(exprs)
        ],
    }


dashboard = {
    "title": "modelgate",
    "uid": "modelgate",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "time": {"from": "now-1h", "to": "now"},
    "refresh": "30s",
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus"},
        {"name": "model", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": "label_values(modelgate_model_versions_ready, model)", "includeAll": True,
         "multi": True, "current": {"text": "All", "value": "$__all"}},
    ]},
    "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
}
out = Path(__file__).with_name("modelgate.json")
out.write_text(json.dumps(dashboard, indent=2) + "\n")
print("wrote", out)
