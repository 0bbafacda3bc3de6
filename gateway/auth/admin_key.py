"""The admin gate of management routes (the model API): the caller must have the admin role.

An admin is an admin user (JWT access token or API key) or the ADMIN_API_KEY break-glass key;
see `gateway.auth.principal`. `require_admin` is the same dependency as `gateway.deps.get_admin`,
so a route that also declares `AdminDep` resolves the caller once.
"""

from __future__ import annotations

from gateway.deps import AdminDep, get_admin

require_admin = get_admin

__all__ = ["AdminDep", "require_admin"]
