"""The shipped Grafana dashboards follow Grafana's dashboard schema rules (the dashboard kind:
uid, title, schemaVersion; panels with unique ids, a type, a gridPos inside the 24-column grid,
targets with unique refIds; datasource references) and resolve to the provisioned datasource.

No Grafana runs here; the rules are those of Grafana's dashboard schema, checked one by one.
The PromQL of every panel is evaluated against a real Prometheus in
tests/gateway/metrics/test_prometheus.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.grafana import DASHBOARDS, DEPLOY, PROVISIONING, dashboards, panels, queries

# Grafana's dashboard uid: at most 40 characters of letters, digits, '-' and '_'.
_UID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
_PANEL_TYPES = {"timeseries", "stat", "gauge", "bargauge", "table", "text", "row", "state-timeline"}
_EXPECTED = {"overview.json", "models.json", "gpus.json", "users-limits.json"}


def _datasource() -> dict[str, Any]:
    config = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert config["apiVersion"] == 1
    (datasource,) = config["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"  # the compose service
    return dict(datasource)


def test_the_four_dashboards_are_shipped() -> None:
    assert set(dashboards()) == _EXPECTED


def test_dashboard_level_rules() -> None:
    uids, titles = set(), set()
    for name, board in dashboards().items():
        assert _UID.match(board["uid"]), name
        assert board["title"].strip(), name
        assert isinstance(board["schemaVersion"], int), name
        assert board["schemaVersion"] >= 36, name
        assert board.get("id") is None, f"{name}: a provisioned dashboard has no numeric id"
        assert board["editable"] in (True, False)
        assert board["graphTooltip"] in (0, 1, 2)
        assert set(board["time"]) == {"from", "to"}
        assert "vllm-chat-gateway" in board["tags"]
        uids.add(board["uid"])
        titles.add(board["title"])
    assert len(uids) == len(titles) == len(_EXPECTED), "uids and titles must be unique"


def test_panel_rules() -> None:
    datasource = _datasource()
    reference = {"type": "prometheus", "uid": datasource["uid"]}
    for name, board in dashboards().items():
        ids: set[int] = set()
        cells: set[tuple[int, int]] = set()
        for panel in panels(board):
            label = f"{name} / {panel.get('title')}"
            assert isinstance(panel["id"], int), label
            assert panel["id"] not in ids, label
            ids.add(panel["id"])
            assert panel["type"] in _PANEL_TYPES, label
            assert panel["title"].strip(), label
            assert panel["description"].strip(), label
            pos = panel["gridPos"]
            assert set(pos) >= {"h", "w", "x", "y"}, label
            assert pos["h"] > 0, label
            assert 0 < pos["w"] <= 24, label
            assert 0 <= pos["x"] < 24, label
            assert pos["x"] + pos["w"] <= 24, label
            assert pos["y"] >= 0, label
            # No two panels cover the same grid cell.
            for x in range(pos["x"], pos["x"] + pos["w"]):
                for y in range(pos["y"], pos["y"] + pos["h"]):
                    assert (x, y) not in cells, f"{label} overlaps another panel"
                    cells.add((x, y))
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == reference, label
            targets = panel["targets"]
            assert targets, label
            ref_ids = [target["refId"] for target in targets]
            assert len(set(ref_ids)) == len(ref_ids), f"{label}: duplicate refId"
            for target in targets:
                assert target["datasource"] == reference, label
                assert target["expr"].strip(), label
                # Only gateway series: the dashboards need nothing but the gateway's /metrics.
                assert "gateway_" in target["expr"], label
        for variable in board.get("templating", {}).get("list", []):
            assert variable["datasource"] == reference, f"{name}: variable {variable['name']}"


def test_every_gateway_series_is_on_a_dashboard() -> None:
    from gateway.metrics import series

    exprs = " ".join(query.expr for query in queries())
    names = {
        metric._name
        for metric in vars(series).values()
        if hasattr(metric, "_name") and hasattr(metric, "_type")
    }
    assert len(names) >= 25
    missing = sorted(name for name in names if name not in exprs)
    assert not missing, f"series no dashboard shows: {missing}"


def test_provisioning_points_where_compose_mounts_the_dashboards() -> None:
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "vllm-gateway.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    mounts = dict(
        volume.rsplit(":", 2)[:2] if volume.count(":") >= 2 else volume.split(":", 1)
        for volume in compose["services"]["grafana"]["volumes"]
    )
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = compose["services"]["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    ]
    assert Path(home).name in _EXPECTED
    assert Path(home).parent == Path(provider["options"]["path"])
    assert (DASHBOARDS / Path(home).name).exists()
