"""completions-proxy: an OpenAI-compatible logging proxy that captures chat completions."""

__version__ = "0.1.0"
