"""LLM providers behind one interface (base.Provider). Adding one is a new module and one line in PROVIDERS."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from harmonia.rerank.llm.providers.base import (
    RETRYABLE,
    ConnectionFailed,
    Provider,
    ProviderError,
    ProviderFatal,
    ProviderResponse,
    RateLimited,
    ServerError,
    Timeout,
    error_kind,
)

if TYPE_CHECKING:
    from harmonia.config import LLMSettings

# name -> "module:Class"; imported lazily so a missing optional SDK only matters to whoever selects it
PROVIDERS: dict[str, str] = {
    "anthropic": "harmonia.rerank.llm.providers.anthropic:AnthropicProvider",
    "openai": "harmonia.rerank.llm.providers.openai:OpenAIProvider",
    "ollama": "harmonia.rerank.llm.providers.ollama:OllamaProvider",
}


def provider_class(name: str) -> type[Provider]:
    if name not in PROVIDERS:
        raise ValueError(f"setting 'llm_provider': {name!r} is not one of {', '.join(PROVIDERS)}")
    module, cls = PROVIDERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_provider(cfg: LLMSettings, **client_kwargs: Any) -> Provider:
    """The provider `llm_provider` names. client_kwargs go to the SDK client (e.g. http_client)."""
    return provider_class(cfg.provider)(cfg, **client_kwargs)


__all__ = ["PROVIDERS", "RETRYABLE", "ConnectionFailed", "Provider", "ProviderError", "ProviderFatal",
           "ProviderResponse", "RateLimited", "ServerError", "Timeout", "error_kind", "get_provider",
           "provider_class"]
