"""API keys: issued once, stored as a digest, scoped by tier and models."""
