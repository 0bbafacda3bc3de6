"""Import every table module so `Base.metadata` is complete (Alembic and tests use this)."""

from gateway.auth import models as auth_models
from gateway.conversations import models as conversations_models
from gateway.db import Base
from gateway.keys import models as keys_models
from gateway.replicas import models as replicas_models
from gateway.usage import models as usage_models
from gateway.users import models as users_models

__all__ = [
    "Base",
    "auth_models",
    "conversations_models",
    "keys_models",
    "replicas_models",
    "usage_models",
    "users_models",
]
