"""Service information at the root URL."""
