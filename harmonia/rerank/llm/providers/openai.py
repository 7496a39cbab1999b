"""OpenAI chat completions through the official `openai` SDK. The same module serves any OpenAI-compatible
server (vLLM, LM Studio, llama.cpp) through `llm_base_url`.

Three request modes, tried in order until one answers: `tool` (a strict function tool forced with tool_choice),
`json_schema` (response_format with the same schema) and `text` (no constraint; the JSON object is parsed out of
the answer). A server that refuses tool_choice or strict mode (HTTP 400/422 naming them) moves on to the next
mode for good; a reply with text and no tool call asks once more in json_schema mode. Every answer is validated
by the same schema in the reranker, and `ProviderResponse.mode` says which mode produced it.

Reasoning models (o1/o3/o4, gpt-5...; `llm_reasoning`) get max_completion_tokens, no temperature and
`llm_reasoning_effort`; a server that refuses max_tokens or temperature switches to that form on the spot.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from typing import TYPE_CHECKING, Any

import openai

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

MODES = ("tool", "json_schema", "text")
_REASONING_NAME = re.compile(r"^(o\d|gpt-5)", re.IGNORECASE)
# what a server's 400 says when it refuses a mode (checked in lower case)
_REFUSES_TOOLS = ("tool_choice", "tools", "tool ", "function", "strict")
_REFUSES_FORMAT = ("response_format", "json_schema")


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


def is_reasoning_model(model: str, setting: str = "auto") -> bool:
    if setting in ("yes", "true", "1"):
        return True
    if setting in ("no", "false", "0"):
        return False
    return bool(_REASONING_NAME.match(model.rsplit("/", 1)[-1]))


class _Refused(Exception):
    """The server refused this request mode (not the model, the key or the input)."""


class OpenAIProvider(Provider):
    name = "openai"
    default_url = "https://api.openai.com/v1"

    def __init__(self, cfg: LLMSettings, **kw: Any) -> None:
        super().__init__(cfg)
        key = read_api_key(cfg, "OPENAI_API_KEY", self.default_url)
        if not key and not cfg.base_url:
            raise ProviderFatal("no OpenAI API key: set OPENAI_API_KEY, llm_api_key_env or llm_api_key_file "
                                "(or use reranker = \"none\" offline)")
        self.client = openai.OpenAI(
            # a custom server with no key named for it gets a placeholder, never OPENAI_API_KEY
            api_key=key or "no-key", base_url=cfg.base_url or self.default_url, timeout=cfg.timeout_s,
            max_retries=0, **kw)  # tenacity in harmonia.rerank.llm.reranker owns retries
        self.mode = 0  # index into MODES: where requests start (moves on when the server refuses a mode)
        self.reasoning = is_reasoning_model(cfg.model, cfg.reasoning)

    def sampling(self) -> dict[str, Any]:
        if self.reasoning:
            out: dict[str, Any] = {"max_completion_tokens": self.cfg.max_tokens}
            if self.cfg.reasoning_effort:
                out["reasoning_effort"] = self.cfg.reasoning_effort
            return out
        return {"max_tokens": self.cfg.max_tokens, "temperature": self.cfg.temperature}

    def _create(self, **kw: Any) -> Any:
        for _ in range(3):  # at most two parameter fixes (max_tokens, temperature), then the answer or the error
            try:
                # Plain dicts for messages and tools: the SDK's TypedDict parameters describe the same JSON.
                return self.client.chat.completions.create(model=self.model, **self.sampling(), **kw)
            except openai.BadRequestError as exc:
                msg = str(exc).lower()
                if not self.reasoning and ("max_completion_tokens" in msg or
                                           ("temperature" in msg and "unsupported" in msg)):
                    self.reasoning = True  # the server says it is a reasoning model: use its parameters
                    continue
                if self.reasoning and self.cfg.reasoning_effort and "reasoning_effort" in msg:
                    self.cfg = dataclasses.replace(self.cfg, reasoning_effort="")
                    continue
                raise
        raise ProviderFatal("the server refused every form of the sampling parameters")

    def _request(self, mode: str, system: str, messages: list[dict[str, str]], schema: dict[str, Any],
                 tool_name: str, tool_description: str) -> Any:
        msgs: list[dict[str, str]] = [{"role": "system", "content": system}, *messages]
        try:
            if mode == "tool":
                return self._create(messages=msgs, tools=[{"type": "function", "function": {
                    "name": tool_name, "description": tool_description, "strict": True,
                    "parameters": strict_schema(schema)}}], tool_choice={"type": "function",
                                                                          "function": {"name": tool_name}})
            if mode == "json_schema":
                return self._create(messages=msgs, response_format={"type": "json_schema", "json_schema": {
                    "name": tool_name, "description": tool_description, "strict": True,
                    "schema": strict_schema(schema)}})
            msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] + "\n\nAnswer with only the JSON object of "
                        f"{tool_name}, which this JSON Schema describes:\n{json.dumps(schema)}"}
            return self._create(messages=msgs)
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            msg = str(exc).lower()
            markers = _REFUSES_TOOLS if mode == "tool" else _REFUSES_FORMAT if mode == "json_schema" else ()
            if any(m in msg for m in markers):
                raise _Refused(str(exc)) from exc
            raise ProviderFatal(str(exc)) from exc
        except openai.RateLimitError as exc:
            raise RateLimited(str(exc), parse_retry_after(exc.response.headers.get("retry-after"))) from exc
        except openai.APITimeoutError as exc:
            raise Timeout(str(exc)) from exc
        except openai.APIConnectionError as exc:
            raise ConnectionFailed(f"connection failed: {exc}") from exc
        except openai.APIStatusError as exc:
            if exc.status_code >= 500:
                raise ServerError(str(exc), parse_retry_after(exc.response.headers.get("retry-after"))) from exc
            raise ProviderFatal(str(exc)) from exc

    @staticmethod
    def _answer(mode: str, resp: Any) -> tuple[dict[str, Any] | None, str]:
        """(the answer's JSON object or None, the text to show the model in a re-ask)."""
        msg = resp.choices[0].message
        text = msg.content or ""
        if mode == "tool":
            calls = [c for c in (msg.tool_calls or []) if getattr(c, "function", None) is not None]
            if not calls:
                return None, text
            args = calls[0].function.arguments
            try:
                parsed = json.loads(args)
            except json.JSONDecodeError:
                return None, text or args  # unparseable arguments: shown to the model in the re-ask
            if isinstance(parsed, dict):
                return parsed, text
            return None, text or f"tool arguments were not a JSON object: {args[:500]}"
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = json_in_text(text)
        return (parsed, "") if isinstance(parsed, dict) else (None, text)

    def call(self, system: str, messages: list[dict[str, str]], tool_schema: dict[str, Any],
             tool_name: str, tool_description: str = "") -> ProviderResponse:
        raws: list[dict[str, Any]] = []
        tokens_in = tokens_out = 0
        refusals: list[str] = []
        start = self.mode
        i = start
        tool_input: dict[str, Any] | None = None
        text = ""
        while i < len(MODES):
            mode = MODES[i]
            try:
                resp = self._request(mode, system, messages, tool_schema, tool_name, tool_description)
            except _Refused as exc:
                refusals.append(f"{mode}: {str(exc)[:300]}")
                self.mode = i = i + 1  # this server does not take the mode: never ask it that way again
                continue
            raws.append(resp.model_dump(mode="json"))
            if resp.usage:
                tokens_in += resp.usage.prompt_tokens or 0
                tokens_out += resp.usage.completion_tokens or 0
            if not resp.choices:
                raise ServerError("response without choices")
            tool_input, text = self._answer(mode, resp)
            if tool_input is not None or mode != "tool":
                break
            i += 1  # text and no tool call: ask once more with response_format json_schema
        else:
            raise ProviderFatal("the server refused every request mode: " + "; ".join(refusals))
        raw: dict[str, Any] = {"responses": raws, "mode": MODES[i]} if len(raws) > 1 or refusals else raws[0]
        if refusals:
            raw["refused"] = refusals
        return ProviderResponse(tool_input=tool_input, text=text, input_tokens=tokens_in, output_tokens=tokens_out,
                                raw=raw, mode=MODES[i])

    def close(self) -> None:
        self.client.close()
