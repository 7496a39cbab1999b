"""Local stand-ins for the LLM providers: a real HTTP server on 127.0.0.1 answering in each provider's wire
format, so the real SDK clients (anthropic, openai, ollama) send and parse exactly what they would with the real
service (and the SDKs' choice of HTTP library does not matter).

A stub plays a script of steps, one per HTTP request:
  ("tool", {...})           a tool call with this input
  ("prose", "text")         an answer without a tool call
  ("status", 429, {"retry-after": "0.2"})   an HTTP error with headers
  ("error", 400, "message")  an HTTP error carrying the server's own message (a refusal: "does not support tools")
  ("json", {...})           the JSON answer written in the message text, no tool call (llama.cpp ignoring tools)
  ("timeout",)              the answer comes too late (after TIMEOUT_SLEEP_S; set llm_timeout_s below it)
  ("fn", f)                 f(request body) returns one of the steps above (answers that depend on the input)
The last step repeats when the script runs out. Every request body is kept (parsed) with its time.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from harmonia.domain import Candidate

Step = tuple
TIMEOUT_SLEEP_S = 2.5


def candidates(n: int = 50, start: int = 1000) -> list[Candidate]:
    """n plausible candidates with ids start.. (the first is the 'right' one in these tests)."""
    return [Candidate(concept_id=start + i, concept_name=f"Concept {i}", domain_id="Condition",
                      vocabulary_id="SNOMED", concept_class_id="Clinical Finding", concept_code=str(900 + i),
                      similarity=0.9 - i * 0.01) for i in range(n)]


def user_payload(request: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The source term and candidates the reranker sent (from the first user message, any provider)."""
    msg = next(m for m in request["messages"] if m["role"] == "user")["content"]
    source = json.loads(msg.split("\n")[1])
    cands = json.loads(msg.split("Candidates (")[1].split("\n")[1])
    return source, cands


def good_input(ids: list[int], confidence: float = 0.95, no_match: bool = False) -> dict[str, Any]:
    return {"ranked": [{"concept_id": cid, "score": round(0.9 - i * 0.1, 2), "rationale": f"reason {i}"}
                       for i, cid in enumerate(ids)], "confidence": confidence, "no_match": no_match}


class Stub:
    provider = "base"

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.times: list[float] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status, headers, payload, delay = stub.answer(self.path, dict(self.headers), body)
                if delay:
                    time.sleep(delay)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in {**headers, "content-type": "application/json",
                                 "content-length": str(len(data))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (a timeout step)
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def base_url(self) -> str:
        """What llm_base_url should be for this provider's SDK."""
        return self.url

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, dict, float]:
        with self._lock:
            request = json.loads(body or b"{}")
            self.requests.append(request)
            self.headers.append({k.lower(): v for k, v in headers.items()})
            self.times.append(time.monotonic())
            self.paths.append(path)
            step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if step[0] == "fn":
            step = step[1](request)
        kind = step[0]
        if kind == "timeout":
            return 200, {}, self.prose_body(request, "too late"), TIMEOUT_SLEEP_S
        if kind == "status":
            return step[1], (step[2] if len(step) > 2 else {}), self.error_body(step[1]), 0.0
        if kind == "error":
            return step[1], {}, self.error_body(step[1], step[2]), 0.0
        if kind == "json":
            return 200, {}, self.prose_body(request, "Here is my answer:\n```json\n" + json.dumps(step[1])
                                            + "\n```"), 0.0
        if kind == "tool":
            return 200, {}, self.tool_body(request, step[1]), 0.0
        return 200, {}, self.prose_body(request, step[1]), 0.0

    # wire formats
    def tool_body(self, request: dict[str, Any], tool_input: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def prose_body(self, request: dict[str, Any], text: str) -> dict[str, Any]:
        raise NotImplementedError

    def error_body(self, status: int, message: str = "") -> dict[str, Any]:
        raise NotImplementedError


class AnthropicStub(Stub):
    """POST /v1/messages (Anthropic Messages API)."""

    provider = "anthropic"

    def _msg(self, content: list[dict[str, Any]], stop: str) -> dict[str, Any]:
        return {"id": f"msg_{len(self.requests):04d}", "type": "message", "role": "assistant",
                "model": "claude-stub", "content": content, "stop_reason": stop, "stop_sequence": None,
                "usage": {"input_tokens": 1500, "output_tokens": 120, "cache_creation_input_tokens": 0,
                          "cache_read_input_tokens": 0}}

    def tool_body(self, request: dict[str, Any], tool_input: dict[str, Any]) -> dict[str, Any]:
        name = request["tool_choice"]["name"]
        return self._msg([{"type": "text", "text": "Ranking the candidates."},
                          {"type": "tool_use", "id": "toolu_01A", "name": name, "input": tool_input}], "tool_use")

    def prose_body(self, request: dict[str, Any], text: str) -> dict[str, Any]:
        return self._msg([{"type": "text", "text": text}], "end_turn")

    def error_body(self, status: int, message: str = "") -> dict[str, Any]:
        kind = {429: "rate_limit_error", 529: "overloaded_error", 400: "invalid_request_error"}.get(status,
                                                                                                     "api_error")
        return {"type": "error", "error": {"type": kind, "message": message or f"stub {status}"}}


class OpenAIStub(Stub):
    """POST /v1/chat/completions (OpenAI Chat Completions API)."""

    provider = "openai"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def _completion(self, message: dict[str, Any], finish: str) -> dict[str, Any]:
        return {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": 1763780000,
                "model": "gpt-stub", "system_fingerprint": "fp_stub",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": {"prompt_tokens": 1400, "completion_tokens": 100, "total_tokens": 1500}}

    def tool_body(self, request: dict[str, Any], tool_input: dict[str, Any]) -> dict[str, Any]:
        if "tool_choice" not in request:  # response_format json_schema (or plain) request: JSON in the content
            return self._completion({"role": "assistant", "content": json.dumps(tool_input), "refusal": None},
                                    "stop")
        name = request["tool_choice"]["function"]["name"]
        return self._completion({"role": "assistant", "content": None, "refusal": None, "tool_calls": [
            {"id": "call_abc123", "type": "function",
             "function": {"name": name, "arguments": json.dumps(tool_input)}}]}, "tool_calls")

    def prose_body(self, request: dict[str, Any], text: str) -> dict[str, Any]:
        return self._completion({"role": "assistant", "content": text, "refusal": None}, "stop")

    def error_body(self, status: int, message: str = "") -> dict[str, Any]:
        kind = {429: "requests", 400: "invalid_request_error"}.get(status, "server_error")
        return {"error": {"message": message or f"stub {status}", "type": kind,
                          "param": None, "code": "rate_limit_exceeded" if status == 429 else None}}


class OllamaStub(Stub):
    """POST /api/chat (Ollama). A 'prose' step answers prose to the tool request; the provider then retries with
    `format` = the schema, which the next step answers (a 'tool' step answers it as JSON content)."""

    provider = "ollama"

    def _chat(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"model": "llama-stub", "created_at": "2026-11-22T04:00:00.000000Z", "message": message,
                "done_reason": "stop", "done": True, "total_duration": 1_200_000_000, "load_duration": 1_000_000,
                "prompt_eval_count": 1300, "prompt_eval_duration": 800_000_000, "eval_count": 90,
                "eval_duration": 400_000_000}

    def tool_body(self, request: dict[str, Any], tool_input: dict[str, Any]) -> dict[str, Any]:
        if "format" in request:  # the schema-constrained fallback answers in content
            return self._chat({"role": "assistant", "content": json.dumps(tool_input)})
        name = request["tools"][0]["function"]["name"]
        return self._chat({"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": name, "arguments": tool_input}}]})

    def prose_body(self, request: dict[str, Any], text: str) -> dict[str, Any]:
        return self._chat({"role": "assistant", "content": text})

    def error_body(self, status: int, message: str = "") -> dict[str, Any]:
        return {"error": message or f"stub {status}"}


STUBS: dict[str, type[Stub]] = {"anthropic": AnthropicStub, "openai": OpenAIStub, "ollama": OllamaStub}


def model_version_of(s: Any) -> str:
    """The model_version an LLM reranker built from settings `s` gives its decisions (provider, model, server,
    prompt, sampling), for calibrating it in tests."""
    from harmonia.rerank.llm.providers import get_provider
    from harmonia.rerank.llm.reranker import LLMReranker

    provider = get_provider(s.llm)
    try:
        return LLMReranker(s.llm, provider, top_n=s.rerank.top_n).model_version
    finally:
        provider.close()
