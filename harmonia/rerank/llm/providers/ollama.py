"""Ollama through the official `ollama` client: the rerank tool first; when the model answers without a tool
call (many local models do not support tools), a second request constrained with `format` = the JSON schema."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx
import ollama

from harmonia.rerank.llm.providers.base import (
    Provider,
    ProviderFatal,
    ProviderResponse,
    RateLimited,
    ServerError,
    Timeout,
    parse_retry_after,
)

if TYPE_CHECKING:
    from harmonia.config import LLMSettings


class OllamaProvider(Provider):
    name = "ollama"

    def __init__(self, cfg: LLMSettings, **kw: Any) -> None:
        super().__init__(cfg)
        # ollama.ResponseError drops the headers; a response hook keeps Retry-After for this thread's request
        self._last = threading.local()
        self.client = ollama.Client(host=cfg.base_url or None, timeout=cfg.timeout_s,
                                    event_hooks={"response": [self._remember]}, **kw)

    def _remember(self, response: httpx.Response) -> None:
        self._last.retry_after = parse_retry_after(response.headers.get("retry-after"))

    def _chat(self, **kw: Any) -> Any:
        self._last.retry_after = None
        try:
            return self.client.chat(model=self.model, stream=False,
                                    options={"temperature": self.cfg.temperature,
                                             "num_predict": self.cfg.max_tokens}, **kw)
        except ollama.ResponseError as exc:
            retry_after = getattr(self._last, "retry_after", None)
            if exc.status_code == 429:
                raise RateLimited(str(exc), retry_after) from exc
            if exc.status_code >= 500:
                raise ServerError(str(exc), retry_after) from exc
            raise ProviderFatal(f"HTTP {exc.status_code}: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise Timeout(f"timed out: {exc}") from exc
        except (ConnectionError, httpx.TransportError) as exc:
            raise Timeout(f"connection failed: {exc}") from exc

    def call(self, system: str, messages: list[dict[str, str]], tool_schema: dict[str, Any],
             tool_name: str, tool_description: str = "") -> ProviderResponse:
        msgs = [{"role": "system", "content": system}, *messages]
        tool = {"type": "function", "function": {"name": tool_name, "description": tool_description,
                                                 "parameters": tool_schema}}
        resp = self._chat(messages=msgs, tools=[tool])
        raws = [resp.model_dump(mode="json")]
        tokens_in, tokens_out = resp.prompt_eval_count or 0, resp.eval_count or 0
        calls = [c for c in (resp.message.tool_calls or []) if c.function.name == tool_name]
        if calls and isinstance(calls[0].function.arguments, Mapping):
            return ProviderResponse(tool_input=dict(calls[0].function.arguments), text=resp.message.content or "",
                                    input_tokens=tokens_in, output_tokens=tokens_out, raw={"responses": raws})
        # No tool call: ask again with the output constrained to the schema and parse the content
        resp2 = self._chat(messages=msgs, format=tool_schema)
        raws.append(resp2.model_dump(mode="json"))
        tokens_in += resp2.prompt_eval_count or 0
        tokens_out += resp2.eval_count or 0
        content = resp2.message.content or ""
        try:
            parsed = json.loads(content)
        except json.JSONDecodeError:
            parsed = None
        return ProviderResponse(tool_input=parsed if isinstance(parsed, dict) else None,
                                text=content if not isinstance(parsed, dict) else "",
                                input_tokens=tokens_in, output_tokens=tokens_out,
                                raw={"responses": raws, "format_fallback": True})

    def close(self) -> None:
        self.client.close()
