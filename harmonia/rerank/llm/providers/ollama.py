"""Ollama through the official `ollama` client: the rerank tool first; a model without tool support (HTTP 400
"... does not support tools") or an answer without a tool call gets a request constrained with `format` = the
JSON schema. A model that refused tools is asked with `format` from then on (ProviderResponse.mode says which)."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx
import ollama

from harmonia.rerank.llm.providers.base import (
    ConnectionFailed,
    Provider,
    ProviderFatal,
    ProviderResponse,
    RateLimited,
    ServerError,
    Timeout,
    json_in_text,
    parse_retry_after,
    read_api_key,
)

if TYPE_CHECKING:
    from harmonia.config import LLMSettings


class _NoTools(Exception):
    """The model does not support tools."""


class OllamaProvider(Provider):
    name = "ollama"
    default_url = "http://127.0.0.1:11434"

    def __init__(self, cfg: LLMSettings, **kw: Any) -> None:
        super().__init__(cfg)
        # ollama.ResponseError drops the headers; a response hook keeps Retry-After for this thread's request
        self._last = threading.local()
        key = read_api_key(cfg, None, self.default_url)  # only a key named for it (a proxy, ollama's cloud)
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self.client = ollama.Client(host=cfg.base_url or self.default_url, timeout=cfg.timeout_s,
                                    event_hooks={"response": [self._remember]}, headers=headers, **kw)
        if not key:  # the client would add OLLAMA_API_KEY on its own, to whatever host is configured
            self.client._client.headers.pop("authorization", None)
        self.tools = True  # False once the model said it does not support tools

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
            if exc.status_code == 400 and "tools" in kw and "does not support tools" in str(exc).lower():
                raise _NoTools(str(exc)) from exc
            raise ProviderFatal(f"HTTP {exc.status_code}: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise Timeout(f"timed out: {exc}") from exc
        except (ConnectionError, httpx.TransportError) as exc:
            raise ConnectionFailed(f"connection failed: {exc}") from exc

    def call(self, system: str, messages: list[dict[str, str]], tool_schema: dict[str, Any],
             tool_name: str, tool_description: str = "") -> ProviderResponse:
        msgs = [{"role": "system", "content": system}, *messages]
        tool = {"type": "function", "function": {"name": tool_name, "description": tool_description,
                                                 "parameters": tool_schema}}
        raws: list[dict[str, Any]] = []
        tokens_in = tokens_out = 0
        refused = ""
        if self.tools:
            try:
                resp = self._chat(messages=msgs, tools=[tool])
            except _NoTools as exc:
                self.tools, refused = False, str(exc)[:300]  # straight to `format`, now and for later calls
            else:
                raws.append(resp.model_dump(mode="json"))
                tokens_in, tokens_out = resp.prompt_eval_count or 0, resp.eval_count or 0
                calls = [c for c in (resp.message.tool_calls or []) if c.function.name == tool_name]
                if calls and isinstance(calls[0].function.arguments, Mapping):
                    return ProviderResponse(tool_input=dict(calls[0].function.arguments),
                                            text=resp.message.content or "", input_tokens=tokens_in,
                                            output_tokens=tokens_out, raw={"responses": raws}, mode="tool")
        # No tool call (or no tools): ask with the output constrained to the schema and parse the content
        resp2 = self._chat(messages=msgs, format=tool_schema)
        raws.append(resp2.model_dump(mode="json"))
        tokens_in += resp2.prompt_eval_count or 0
        tokens_out += resp2.eval_count or 0
        content = resp2.message.content or ""
        try:
            parsed = json.loads(content)
        except json.JSONDecodeError:
            parsed = json_in_text(content)
        raw: dict[str, Any] = {"responses": raws, "format_fallback": True}
        if refused:
            raw["refused"] = refused
        return ProviderResponse(tool_input=parsed if isinstance(parsed, dict) else None,
                                text=content if not isinstance(parsed, dict) else "",
                                input_tokens=tokens_in, output_tokens=tokens_out, raw=raw, mode="format")

    def close(self) -> None:
        self.client.close()
