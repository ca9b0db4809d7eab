"""The Prometheus rules and the Grafana dashboard under deploy/ parse, and every metric they
name is one that is served: the names come from the real registries, the gateway's (with its
collectors reading a real Redis) and Flower's."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry

from gateway.app import metrics_registry
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "refgen-rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "refgen-dashboard.json"

# What a family of each type is scraped as (prometheus_client's exposition).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
}
_PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan",
}  # fmt: skip


def served_names(registry: CollectorRegistry) -> set[str]:
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in _SUFFIXES.get(family.type, ("",))
    }


@pytest.fixture(scope="module")
def served(redis_server) -> set[str]:
    import redis
    from flower.events import get_prometheus_metrics

    get_prometheus_metrics()  # Flower's metrics, in the process's default registry
    flower = {name for name in served_names(REGISTRY) if name.startswith("flower_")}
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    ours = served_names(metrics_registry(Settings(redis_url=redis_server.url), client))
    client.close()
    assert flower and ours
    return flower | ours


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label matchers,
    ranges, grouping lists, numbers, functions and keywords are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)  # Grafana's variables
    text = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", "", text)  # numbers, 1e-9 too
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match[0]
        follows = text[match.end() :].lstrip()[:1]
        if follows == "(" or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_exprs(item)


def test_the_rules_parse_and_hold_the_alerts_operators_want() -> None:
    found = rules()
    names = [rule["alert"] for rule in found]
    assert len(names) == len(set(names))
    for wanted in (
        "RefgenTextOnlyRateHigh",
        "RefgenCostPerHourHigh",
        "RefgenOldestMessageWaitingLong",
        "RefgenWorkerWithoutHeartbeat",
    ):
        assert wanted in names
    for rule in found:
        assert set(rule) >= {"alert", "expr", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]


def test_the_rules_name_only_metrics_that_exist(served: set[str]) -> None:
    for rule in rules():
        named = metric_names(rule["expr"])
        assert named, f"{rule['alert']}: no metric found in its expression"
        assert named <= served, f"{rule['alert']} names unknown metrics: {named - served}"


def test_the_dashboard_parses_and_names_only_metrics_that_exist(served: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert all(p["targets"] and p["title"] for p in panels)
    exprs = list(dashboard_exprs(dashboard))
    assert len(exprs) >= len(panels)
    shown: set[str] = set()
    for expr in exprs:
        named = metric_names(expr)
        assert named, f"no metric found in {expr!r}"
        assert named <= served, f"{expr!r} names unknown metrics: {named - served}"
        assert expr.count("(") == expr.count(")"), expr
        shown |= named
    # Every figure the gateway serves is on the dashboard.
    assert {
        "refgen_jobs_total",
        "refgen_cost_dollars_total",
        "refgen_queue_messages_waiting",
        "refgen_queue_messages_unacked",
        "refgen_queue_oldest_message_age_seconds",
        "refgen_worker_heartbeat_age_seconds",
    } <= shown


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (queue) (rate(a_total{x="y"}[5m])) / on() b', {"a_total", "b"}),
        ("histogram_quantile(0.95, sum by (le) (rate(d_bucket[15m])))", {"d_bucket"}),
        ("max(c) > 300 and on() (count(e < 60) or on() vector(0)) == 0", {"c", "e"}),
        ("a / clamp_min(b, 1e-9) > 0.2", {"a", "b"}),
    ],
)
def test_the_name_finder_finds_the_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
