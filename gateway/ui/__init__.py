"""The web chat and the admin console: static pages served by the gateway itself."""
