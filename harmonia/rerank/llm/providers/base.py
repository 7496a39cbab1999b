"""The one interface every LLM provider implements, and the normalised faults the reranker retries on.

A provider turns (system prompt, messages, tool schema, tool name) into a `ProviderResponse` with the answer's
parsed JSON (the forced tool call's input, or the JSON a fallback mode produced; None when the model answered in
prose), which mode answered, and the token counts it reports. SDK exceptions are translated into the classes
below so retries and error results never depend on one SDK's exception tree; `error_kind` names them with the
retryable kinds of harmonia.domain.RETRYABLE_ERROR_KINDS.

Keys (`read_api_key`): the provider's usual variable (ANTHROPIC_API_KEY, OPENAI_API_KEY) goes only to the
provider's own endpoint; a custom llm_base_url gets a key only when llm_api_key_env or llm_api_key_file names one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from harmonia.config import LLMSettings

log = logging.getLogger(__name__)


class ProviderError(Exception):
    """Base of the normalised provider faults."""

    kind = "provider_error"


class RateLimited(ProviderError):
    """HTTP 429 (or the provider's equivalent); `retry_after` is the server's Retry-After in seconds, if sent."""

    kind = "rate_limited"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerError(ProviderError):
    """HTTP 5xx or an overloaded server: worth retrying."""

    kind = "server_error"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Timeout(ProviderError):
    """The request timed out: worth retrying."""

    kind = "timeout"


class ConnectionFailed(ProviderError):
    """The server could not be reached (refused, DNS, reset): worth retrying, and a sign the server is down."""

    kind = "connection_error"


class ProviderFatal(ProviderError):
    """Bad request, bad key, unknown model: retrying will not help."""

    kind = "provider_fatal"


RETRYABLE = (RateLimited, ServerError, Timeout, ConnectionFailed)


def error_kind(exc: BaseException) -> str:
    """The error kind of a fault: rate_limited, server_error, timeout, connection_error (retryable, see
    harmonia.domain.RETRYABLE_ERROR_KINDS), provider_fatal, or reranker_exception for anything unexpected."""
    return exc.kind if isinstance(exc, ProviderError) else "reranker_exception"


@dataclass
class ProviderResponse:
    tool_input: dict[str, Any] | None   # the answer's JSON object, parsed; None when there was none
    text: str = ""                      # any prose the model produced (or unparseable arguments)
    input_tokens: int = 0
    output_tokens: int = 0
    raw: dict[str, Any] = field(default_factory=dict)  # the provider's response, for the call log
    # Which request answered: tool (forced tool call), json_schema (OpenAI response_format), format (Ollama's
    # schema-constrained output) or text (JSON parsed out of a plain answer)
    mode: str = "tool"


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is rare for APIs and is ignored)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def json_in_text(text: str) -> dict[str, Any] | None:
    """The first JSON object in a model's text (inside a ``` fence or prose), or None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def server_of(base_url: str, default_url: str) -> str:
    """The endpoint a provider talks to, normalised (scheme://host[:port][/path]): part of the cache key and of
    model_version, so two servers with the same model name never share answers."""
    u = urlsplit(base_url or default_url)
    return f"{u.scheme}://{u.netloc}{u.path.rstrip('/')}".lower()


def is_own_endpoint(base_url: str, default_url: str) -> bool:
    """Whether llm_base_url is empty or the provider's own endpoint (same scheme and host)."""
    if not base_url:
        return True
    a, b = urlsplit(base_url), urlsplit(default_url)
    return (a.scheme, a.hostname) == (b.scheme, b.hostname)


def read_api_key(cfg: LLMSettings, default_env: str | None, default_url: str) -> str | None:
    """The API key: llm_api_key_file, else the variable llm_api_key_env names, else the provider's usual variable
    (`default_env`), which is sent only to the provider's own endpoint (`default_url`). A named key that cannot be
    read is a one-line ProviderFatal."""
    key: str | None
    if cfg.api_key_file:
        path = Path(cfg.api_key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ProviderFatal(f"setting 'llm_api_key_file': cannot read {path} "
                                f"({exc.strerror or type(exc).__name__})") from None
        if not key:
            raise ProviderFatal(f"setting 'llm_api_key_file': {path} is empty")
    elif cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env) or None
        if key is None:
            raise ProviderFatal(f"setting 'llm_api_key_env': the environment variable {cfg.api_key_env} is not set")
    elif default_env and is_own_endpoint(cfg.base_url, default_url):
        return os.environ.get(default_env) or None
    else:
        return None  # a custom endpoint and no key named for it: the provider's default key stays home
    u = urlsplit(cfg.base_url)
    if cfg.base_url and u.scheme == "http" and u.hostname not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the LLM API key goes over plain HTTP to %s", u.hostname)
    return key


class Provider:
    """Subclasses set `name` and `default_url`, build their SDK client in __init__ (with the SDK's own retries
    off: tenacity owns retries) and implement `call`."""

    name = "base"
    default_url = ""

    def __init__(self, cfg: LLMSettings, **client_kwargs: Any) -> None:
        self.cfg = cfg
        self.model = cfg.model

    @property
    def server(self) -> str:
        return server_of(self.cfg.base_url, self.default_url)

    def sampling(self) -> dict[str, Any]:
        """The parameters that shape an answer besides the prompt (part of the cache key and model_version)."""
        return {"temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}

    def call(self, system: str, messages: list[dict[str, str]], tool_schema: dict[str, Any],
             tool_name: str, tool_description: str = "") -> ProviderResponse:
        raise NotImplementedError

    def close(self) -> None:  # an optional hook: a provider without a client to close keeps it
        pass
