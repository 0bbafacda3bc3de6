"""vLLM Chat Gateway: the FastAPI service clients talk to."""

__version__ = "0.1.0"
