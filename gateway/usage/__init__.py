"""Usage: every proxied request, recorded off the hot path."""
