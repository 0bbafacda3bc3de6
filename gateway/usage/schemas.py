"""Usage report bodies."""

from __future__ import annotations

import uuid
from datetime import date, datetime

from pydantic import BaseModel, Field


class UsageStats(BaseModel):
    """Counts over a set of requests."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    errors: int = Field(default=0, description="Requests answered with a status >= 400.")
    cloud_requests: int = Field(default=0, description="Requests sent to the cloud (overflow).")
    avg_duration_ms: float = 0.0


class DayUsage(UsageStats):
    """One UTC day."""

    date: date


class UserUsage(UsageStats):
    """One user (None: requests made without credentials, REQUIRE_AUTH=false)."""

    user_id: uuid.UUID | None
    username: str | None


class KeyUsage(UsageStats):
    """One API key (None: requests made with a login token, or without credentials)."""

    key_id: uuid.UUID | None
    prefix: str | None


class ModelUsage(UsageStats):
    """One model name as the client asked for it."""

    model: str | None


class UsageReport(BaseModel):
    """Usage over the last `days` UTC days, today included."""

    days: int
    since: datetime
    until: datetime
    totals: UsageStats
    by_day: list[DayUsage] = Field(description="Every day of the range, oldest first.")
    by_user: list[UserUsage]
    by_key: list[KeyUsage]
    by_model: list[ModelUsage]
