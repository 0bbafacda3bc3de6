"""Import every table module so `Base.metadata` is complete (Alembic and tests use this)."""

from gateway.db import Base
from gateway.users import models as users_models

__all__ = ["Base", "users_models"]
