"""Scrapes of /metrics, parsed; polling helpers."""

from __future__ import annotations

from collections.abc import Iterable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.polling import eventually

Labels = dict[str, str]


class Scrape:
    """One parsed /metrics answer."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, Labels, float]] = [
            (sample.name, dict(sample.labels), float(sample.value))
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, /, **labels: str) -> float:
        """The sum of every sample of `name` whose labels include `labels` (0 when none)."""
        return sum(v for n, lab, v in self.samples if n == name and _has(lab, labels))

    def series(self, name: str) -> list[Labels]:
        """The label sets of every sample named `name`."""
        return [lab for n, lab, _ in self.samples if n == name]

    def label_values(self, name: str, label: str) -> set[str]:
        """Every value `label` takes on samples named `name`."""
        return {lab[label] for lab in self.series(name) if label in lab}


def _has(labels: Labels, wanted: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in wanted.items())


async def scrape(client: httpx.AsyncClient, token: str | None = None) -> Scrape:
    """GET /metrics (with the bearer token when given); fails on anything but 200."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


async def wait_engine_ready(client: httpx.AsyncClient, timeout_s: float = 30.0) -> None:
    """Until /health/ready says the engine is up."""

    async def ready() -> bool:
        return (await client.get("/health/ready")).status_code == 200

    await eventually(ready, timeout_s)


def all_label_values(samples: Iterable[tuple[str, Labels, float]]) -> set[str]:
    """Every label value of every sample."""
    return {value for _, labels, _ in samples for value in labels.values()}
