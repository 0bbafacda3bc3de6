"""The OpenAI-compatible proxy: /v1/*, admission, overflow, streaming relay."""
