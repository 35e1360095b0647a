"""docker/'s metrics files: the Grafana dashboard parses and asks only for metrics, and labels,
that mailer exports; the Prometheus and compose files name real ports, commands and hooks."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from mailer import config, hooks, metrics, metrics_outbox
from mailer.cli import cli
from mailer.hooks import metrics as hook

DOCKER = Path(__file__).resolve().parent.parent / "docker"
DASHBOARD = DOCKER / "grafana" / "mailer-dashboard.json"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported() -> dict[str, set[str]]:
    """{series name: its label names} of every metric mailer exports."""
    found: dict[str, set[str]] = {}
    for metric in hook.WORKER_METRICS:
        for family in metric.describe():
            for suffix in _SUFFIXES[family.type]:
                labels = set(metric._labelnames) | ({"le"} if suffix == "_bucket" else set())
                found[family.name + suffix] = labels
    by_state = {"priority", "state"}
    depth_labels = {"mailer_queue_depth": by_state, "mailer_outbox_deliveries": by_state}
    for name in metrics_outbox.NAMES:
        found[name] = depth_labels.get(name, set())
    return found


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_the_dashboard_is_grafana_json_with_panels_that_query_prometheus() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    queried = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(queried) >= 10
    for panel in queried:
        assert panel["datasource"]["type"] == "prometheus"
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "relay"} <= variables


def test_the_dashboard_asks_only_for_metrics_and_labels_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    known = exported()
    used: set[str] = set()
    for expr in expressions(dashboard):
        names = re.findall(r"\bmailer_[a-z_]+", expr)
        assert names, expr
        for name in names:
            assert name in known, f"{name} (in {expr}) is not exported"
            used.add(name)
        for name, matchers in re.findall(r"\b(mailer_[a-z_]+)\{([^}]*)\}", expr):
            labels = set(re.findall(r"(\w+)\s*[=!]~?", matchers))
            assert labels <= known[name], f"{labels - known[name]} not labels of {name}"
        for grouped in re.findall(r"\bby \(([^)]*)\)", expr):
            labels = {label.strip() for label in grouped.split(",")}
            assert any(labels <= known[n] for n in names), f"by ({grouped}) in {expr}"
    # and every metric mailer exports is on it, one way or another
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families >= {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in known}


def test_prometheus_scrapes_the_port_mailer_metrics_listens_on() -> None:
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text(encoding="utf-8"))
    targets = [
        t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    ]
    assert targets == [f"metrics:{metrics.DEFAULT_PORT}"]
    option = next(p for p in cli.commands["metrics"].params if p.name == "port")
    assert option.default == metrics.DEFAULT_PORT


def test_the_compose_override_runs_real_commands_with_a_shared_directory() -> None:
    compose = yaml.safe_load((DOCKER / "prometheus.compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    command = services["metrics"]["command"]
    assert command[0] in cli.commands
    cli.commands[command[0]].make_context(command[0], list(command[1:]))
    known = {name for name, _, _ in config.VARIABLES}
    for name in ("worker", "metrics"):
        env = services[name]["environment"]
        assert {v for v in env if v.startswith("MAILER_")} <= known
        assert env["PROMETHEUS_MULTIPROC_DIR"] == "/run/mailer-metrics"
        assert "worker-metrics:/run/mailer-metrics" in services[name]["volumes"]
    assert isinstance(
        hooks.resolve(services["worker"]["environment"]["MAILER_HOOKS"]), hook.Metrics
    )
    assert services["metrics"]["pid"] == "service:worker"
    for mount in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        assert (DOCKER / mount.split(":")[0]).exists(), mount
