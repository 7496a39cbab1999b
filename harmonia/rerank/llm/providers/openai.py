"""OpenAI chat completions through the official `openai` SDK: a strict function tool forced with tool_choice.
The same module serves any OpenAI-compatible server (vLLM, LM Studio, llama.cpp) through `llm_base_url`."""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any

import openai

from harmonia.rerank.llm.providers.base import (
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


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAI strict mode wants every object closed and every property required; make it so, recursively."""
    out = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node["additionalProperties"] = False
                node["required"] = list(node["properties"])
            for v in node.values():
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(out)
    out.pop("$schema", None)
    return out


class OpenAIProvider(Provider):
    name = "openai"

    def __init__(self, cfg: LLMSettings, **kw: Any) -> None:
        super().__init__(cfg)
        key = read_api_key(cfg, "OPENAI_API_KEY")
        if not key and not cfg.base_url:
            raise ProviderFatal("no OpenAI API key: set OPENAI_API_KEY, llm_api_key_env or llm_api_key_file "
                                "(or use reranker = \"none\" offline)")
        self.client = openai.OpenAI(
            api_key=key or "unused",  # local OpenAI-compatible servers usually take no key
            base_url=cfg.base_url or None, timeout=cfg.timeout_s,
            max_retries=0, **kw)  # tenacity in harmonia.rerank.llm.reranker owns retries

    def call(self, system: str, messages: list[dict[str, str]], tool_schema: dict[str, Any],
             tool_name: str, tool_description: str = "") -> ProviderResponse:
        try:
            # Plain dicts for messages and tools: the SDK's TypedDict parameters describe the same JSON.
            resp = self.client.chat.completions.create(  # type: ignore[call-overload]
                model=self.model, messages=[{"role": "system", "content": system}, *messages],
                max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature,
                tools=[{"type": "function", "function": {"name": tool_name, "description": tool_description,
                                                         "strict": True, "parameters": strict_schema(tool_schema)}}],
                tool_choice={"type": "function", "function": {"name": tool_name}})
        except openai.RateLimitError as exc:
            raise RateLimited(str(exc), parse_retry_after(exc.response.headers.get("retry-after"))) from exc
        except openai.APITimeoutError as exc:
            raise Timeout(str(exc)) from exc
        except openai.APIConnectionError as exc:
            raise Timeout(f"connection failed: {exc}") from exc
        except openai.APIStatusError as exc:
            if exc.status_code >= 500:
                raise ServerError(str(exc), parse_retry_after(exc.response.headers.get("retry-after"))) from exc
            raise ProviderFatal(str(exc)) from exc
        if not resp.choices:
            raise ServerError("response without choices")
        msg = resp.choices[0].message
        text = msg.content or ""
        tool_input: dict[str, Any] | None = None
        calls = [c for c in (msg.tool_calls or []) if getattr(c, "function", None) is not None]
        if calls:
            args = calls[0].function.arguments
            try:
                parsed = json.loads(args)
                tool_input = parsed if isinstance(parsed, dict) else None
            except json.JSONDecodeError:
                text = text or args  # unparseable arguments: shown to the model in the re-ask
            if tool_input is None:
                text = text or f"tool arguments were not a JSON object: {args[:500]}"
        usage = resp.usage
        return ProviderResponse(tool_input=tool_input, text=text,
                                input_tokens=usage.prompt_tokens if usage else 0,
                                output_tokens=usage.completion_tokens if usage else 0,
                                raw=resp.model_dump(mode="json"))

    def close(self) -> None:
        self.client.close()
