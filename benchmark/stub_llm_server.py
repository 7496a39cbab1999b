"""A stub LLM provider for throughput and fault runs: a tiny local HTTP server speaking the OpenAI
chat.completions wire format. Each request waits `--delay` seconds (a slow model), then answers with a call of
the tool the request forces, ranking the first candidate ids it finds in the user message.

    python benchmark/stub_llm_server.py [--port 8765] [--delay 3] [--confidence 0.95]

Point Harmonia at it with reranker=llm, llm_provider=openai, llm_base_url=http://127.0.0.1:PORT/v1 and any API
key (OPENAI_API_KEY=stub). Listens on 127.0.0.1 only. GET /stats returns the request count.

A provider outage is played by setting `StubState.mode` (in the process that called `serve`): "ok", "error" (answer
`fail_status`, 500 by default, at once) or "hang" (answer only after `hang_s`: the client times out first).
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ID_RE = re.compile(r'"id"\s*:\s*(\d+)')


class StubState:
    def __init__(self, delay: float, confidence: float, top: int = 3) -> None:
        self.delay, self.confidence, self.top = delay, confidence, top
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0  # most requests being answered at once: shows the client's concurrency
        self.mode = "ok"        # ok | error | hang
        self.fail_status = 500
        self.hang_s = 60.0
        self.faults = 0         # requests answered with an error or left hanging
        self.lock = threading.Lock()


def answer(body: dict[str, Any], state: StubState) -> dict[str, Any]:
    """A chat.completion whose message calls the forced tool with the first candidates of the user message."""
    tools = body.get("tools") or []
    forced = (body.get("tool_choice") or {}).get("function", {}).get("name") if isinstance(
        body.get("tool_choice"), dict) else None
    name = forced or (tools[0]["function"]["name"] if tools else "rank_candidates")
    user = next((m.get("content") or "" for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
    if isinstance(user, list):  # content parts
        user = " ".join(p.get("text", "") for p in user if isinstance(p, dict))
    # The first user message holds the candidates; a re-ask's last message does not.
    first_user = next((m.get("content") or "" for m in body.get("messages", []) if m.get("role") == "user"), user)
    ids = [int(x) for x in ID_RE.findall(str(first_user))][: state.top]
    args = {"ranked": [{"concept_id": cid, "score": round(max(0.0, state.confidence - 0.1 * i), 4),
                        "rationale": f"stub: candidate {i + 1} in the list"} for i, cid in enumerate(ids)],
            "confidence": state.confidence if ids else 0.0, "no_match": not ids}
    prompt_tokens = sum(len(str(m.get("content") or "")) for m in body.get("messages", [])) // 4
    completion_tokens = len(json.dumps(args)) // 4
    return {
        "id": f"chatcmpl-stub-{state.requests}", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model", "stub"),
        "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None,
                     "message": {"role": "assistant", "content": None, "refusal": None,
                                 "tool_calls": [{"id": f"call_{state.requests}", "type": "function",
                                                 "function": {"name": name, "arguments": json.dumps(args)}}]}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def make_handler(state: StubState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, code: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client died (a killed worker): nothing to do
                self.close_connection = True

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/stats"):
                self._send(200, {"requests": state.requests, "max_in_flight": state.max_in_flight})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError:
                self._send(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
                return
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            with state.lock:
                state.requests += 1
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
                mode = state.mode
                if mode != "ok":
                    state.faults += 1
            try:
                if mode == "error":
                    self._send(state.fail_status, {"error": {"message": f"stub {state.fail_status}",
                                                             "type": "server_error", "param": None, "code": None}})
                    return
                time.sleep(state.hang_s if mode == "hang" else state.delay)
                self._send(200, answer(body, state))
            finally:
                with state.lock:
                    state.in_flight -= 1

    return Handler


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # many workers connect at once; the default backlog of 5 would drop connects
    daemon_threads = True


def serve(port: int = 0, delay: float = 3.0, confidence: float = 0.95) -> tuple[ThreadingHTTPServer, StubState]:
    """Start the server in a daemon thread; returns it (server.server_address[1] is the port) and its state."""
    state = StubState(delay, confidence)
    server = _Server(("127.0.0.1", port), make_handler(state))
    threading.Thread(target=server.serve_forever, name="stub-llm", daemon=True).start()
    return server, state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--delay", type=float, default=3.0, help="Seconds each answer takes.")
    ap.add_argument("--confidence", type=float, default=0.95, help="Confidence in the first candidate.")
    a = ap.parse_args()
    server, _ = serve(a.port, a.delay, a.confidence)
    print(f"stub LLM on http://127.0.0.1:{server.server_address[1]}/v1 (delay {a.delay}s)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
