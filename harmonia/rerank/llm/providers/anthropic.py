"""Anthropic Messages API through the official `anthropic` SDK, the rerank tool forced with tool_choice.

Sampling: temperature only where the SDK's messages.create still takes it; a model that refuses it (HTTP 400
naming temperature) is asked without it from then on. Anthropic's extended thinking cannot be combined with a
forced tool choice, so llm_reasoning_effort is not sent here."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import anthropic

from harmonia.rerank.llm.providers.base import (
    ConnectionFailed,
    Provider,
    ProviderFatal,
    ProviderResponse,
    RateLimited,
    ServerError,
    Timeout,
    parse_retry_after,
    read_api_key,
)

if TYPE_CHECKING:
    from harmonia.config import LLMSettings


# Newer SDKs (and models) dropped sampling parameters from messages.create; send temperature only where accepted.
_TAKES_TEMPERATURE = "temperature" in inspect.signature(anthropic.resources.messages.Messages.create).parameters


class AnthropicProvider(Provider):
    name = "anthropic"
    default_url = "https://api.anthropic.com"

    def __init__(self, cfg: LLMSettings, **kw: Any) -> None:
        super().__init__(cfg)
        key = read_api_key(cfg, "ANTHROPIC_API_KEY", self.default_url)
        if not key and not cfg.base_url:
            raise ProviderFatal("no Anthropic API key: set ANTHROPIC_API_KEY, llm_api_key_env or llm_api_key_file "
                                "(or use reranker = \"none\" offline)")
        self.client = anthropic.Anthropic(
            # a custom endpoint with no key named for it gets a placeholder, never ANTHROPIC_API_KEY
            api_key=key or "no-key", base_url=cfg.base_url or self.default_url, timeout=cfg.timeout_s,
            max_retries=0, **kw)  # tenacity in harmonia.rerank.llm.reranker owns retries
        self.temperature = _TAKES_TEMPERATURE

    def sampling(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_tokens": self.cfg.max_tokens}
        if self.temperature:
            out["temperature"] = self.cfg.temperature
        return out

    def call(self, system: str, messages: list[dict[str, str]], tool_schema: dict[str, Any],
             tool_name: str, tool_description: str = "") -> ProviderResponse:
        try:
            try:
                resp = self._create(system, messages, tool_schema, tool_name, tool_description)
            except anthropic.BadRequestError as exc:
                if not (self.temperature and "temperature" in str(exc).lower()):
                    raise
                self.temperature = False  # the model takes no temperature: ask without it, now and later
                resp = self._create(system, messages, tool_schema, tool_name, tool_description)
        except anthropic.RateLimitError as exc:
            raise RateLimited(str(exc), parse_retry_after(exc.response.headers.get("retry-after"))) from exc
        except anthropic.APITimeoutError as exc:
            raise Timeout(str(exc)) from exc
        except anthropic.APIConnectionError as exc:
            raise ConnectionFailed(f"connection failed: {exc}") from exc
        except anthropic.APIStatusError as exc:
            if exc.status_code >= 500:  # 500, 503, 529 overloaded
                raise ServerError(str(exc), parse_retry_after(exc.response.headers.get("retry-after"))) from exc
            raise ProviderFatal(str(exc)) from exc
        tool_input = next((b.input for b in resp.content if b.type == "tool_use" and b.name == tool_name), None)
        text = "".join(b.text for b in resp.content if b.type == "text")
        return ProviderResponse(tool_input=dict(tool_input) if isinstance(tool_input, dict) else None, text=text,
                                input_tokens=resp.usage.input_tokens, output_tokens=resp.usage.output_tokens,
                                raw=resp.model_dump(mode="json"), mode="tool")

    def _create(self, system: str, messages: list[dict[str, str]], tool_schema: dict[str, Any], tool_name: str,
                tool_description: str) -> Any:
        # Plain dicts for messages and tools: the SDK's TypedDict parameters describe the same JSON.
        return self.client.messages.create(  # type: ignore[call-overload]
            model=self.model, system=system, messages=messages, **self.sampling(),
            tools=[{"name": tool_name, "description": tool_description, "input_schema": tool_schema}],
            tool_choice={"type": "tool", "name": tool_name})

    def close(self) -> None:
        self.client.close()
