"""Reading the shipped Grafana dashboards: panels, their PromQL, and Grafana's variables."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
PROVISIONING = DEPLOY / "grafana" / "provisioning"

# Grafana's built-in variables, as a query would see them over the default 6 h range with
# Prometheus scraping often (the tests scrape every second).
BUILTINS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
_LABEL_VALUES = re.compile(r"^label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*(\w+)\s*\)$")


@dataclass(frozen=True)
class Query:
    """One panel target."""

    dashboard: str
    panel: str
    ref_id: str
    expr: str


def dashboards() -> dict[str, dict[str, Any]]:
    """Every shipped dashboard by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries() -> list[Query]:
    """Every PromQL expression of every panel of every dashboard."""
    found = []
    for name, board in dashboards().items():
        for panel in panels(board):
            for target in panel.get("targets", []):
                found.append(Query(name, panel["title"], target["refId"], target["expr"]))
    return found


def variable_queries() -> list[tuple[str, str, str]]:
    """(dashboard, metric, label) of every `label_values(metric, label)` variable."""
    found = []
    for name, board in dashboards().items():
        for variable in board.get("templating", {}).get("list", []):
            query = variable.get("query")
            text = query.get("query") if isinstance(query, dict) else query
            match = _LABEL_VALUES.match(str(text))
            assert match, f"{name}: variable {variable.get('name')} is not label_values(): {text}"
            found.append((name, match.group(1), match.group(2)))
    return found


def concrete(expr: str, board: dict[str, Any] | None = None) -> str:
    """The expression as Grafana would send it: built-ins filled, every template variable
    set to "All" (its allValue)."""
    for name, value in BUILTINS.items():
        expr = expr.replace(name, value)
    if board is not None:
        for variable in board.get("templating", {}).get("list", []):
            expr = expr.replace(f"${variable['name']}", str(variable.get("allValue", ".*")))
    assert "$" not in expr, f"unresolved variable in {expr}"
    return expr
