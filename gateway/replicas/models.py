"""The fleet_leader row: who leads the fleet, from where, and its fencing term."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from gateway.db import Base, UtcDateTime, utcnow


class FleetLeader(Base):
    """One row (id 1), rewritten by each replica that takes the lease."""

    __tablename__ = "fleet_leader"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    term: Mapped[int] = mapped_column(BigInteger, default=0)
    holder: Mapped[str] = mapped_column(String(128))
    url: Mapped[str] = mapped_column(String(512))
    since: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
