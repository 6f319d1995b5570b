"""The backend clients: the only code that talks to model servers. One client per host,
chosen by the host's `kind`; both answer in Ollama's shapes, Hermes' one internal format."""

from __future__ import annotations

from hermes.backends.ollama import OllamaClient, set_down_reason
from hermes.backends.openai import OpenAIClient

__all__ = ["OllamaClient", "OpenAIClient", "client_for", "set_down_reason"]


def client_for(kind: str, base_url: str, token_parameter: str | None = None) -> OllamaClient:
    """The client for a host: its `kind`, its URL and, behind an authenticating proxy, where
    its bearer token is stored (hermes.backends.tokens)."""
    return (OpenAIClient if kind == "openai" else OllamaClient)(
        base_url, token_parameter=token_parameter
    )
