"""Hermes: an LLM sidecar that shares a few Ollama models safely between many callers."""

__version__ = "0.1.0"
