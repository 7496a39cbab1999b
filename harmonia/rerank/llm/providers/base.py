"""The one interface every LLM provider implements, and the normalised faults the reranker retries on.

A provider turns (system prompt, messages, tool schema, tool name) into a `ProviderResponse` with the forced
tool call's input (or None when the model answered in prose) and the token counts it reports. SDK exceptions are
translated into the four classes below so retries and error results never depend on one SDK's exception tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harmonia.config import LLMSettings


class ProviderError(Exception):
    """Base of the normalised provider faults."""


class RateLimited(ProviderError):
    """HTTP 429 (or the provider's equivalent); `retry_after` is the server's Retry-After in seconds, if sent."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerError(ProviderError):
    """HTTP 5xx or an overloaded server: worth retrying."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Timeout(ProviderError):
    """The request timed out or the connection failed: worth retrying."""


class ProviderFatal(ProviderError):
    """Bad request, bad key, unknown model: retrying will not help."""


RETRYABLE = (RateLimited, ServerError, Timeout)


@dataclass
class ProviderResponse:
    tool_input: dict[str, Any] | None   # the forced tool call's arguments, parsed; None when there was none
    text: str = ""                      # any prose the model produced (or unparseable arguments)
    input_tokens: int = 0
    output_tokens: int = 0
    raw: dict[str, Any] = field(default_factory=dict)  # the provider's response, for the call log


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is rare for APIs and is ignored)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def read_api_key(cfg: LLMSettings, default_env: str) -> str | None:
    """The API key: llm_api_key_file, else the env var llm_api_key_env, else the provider's usual variable."""
    if cfg.api_key_file:
        return Path(cfg.api_key_file).expanduser().read_text().strip()
    return os.environ.get(cfg.api_key_env or default_env) or None


class Provider:
    """Subclasses set `name`, build their SDK client in __init__ (with the SDK's own retries off: tenacity owns
    retries) and implement `call`."""

    name = "base"

    def __init__(self, cfg: LLMSettings, **client_kwargs: Any) -> None:
        self.cfg = cfg
        self.model = cfg.model

    def call(self, system: str, messages: list[dict[str, str]], tool_schema: dict[str, Any],
             tool_name: str, tool_description: str = "") -> ProviderResponse:
        raise NotImplementedError

    def close(self) -> None:  # an optional hook: a provider without a client to close keeps it
        pass
