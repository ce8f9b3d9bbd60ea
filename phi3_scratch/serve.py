"""`phi3-scratch serve`: the explore view, live, with an Ablate control run by p3.intervene.

    GET  /          the page (explore.html) for the first prompt, with the live form
    POST /api/run   {"prompt": ..., "chat": false, "ablate": {"kind": "head", "layer": 1, "head": 2}}
                    -> {"view": the explore data, "continuation": a short greedy continuation}

- It listens on 127.0.0.1 unless told otherwise: the model answers whoever can reach the port.
- One request at a time: traces and interventions are state on the one shared model, so a lock
  keeps a request's edits away from every other request.
- A bad request (malformed JSON, an unknown layer, a prompt too long, a body over MAX_BODY) gets a
  4xx answer with a message, and the server goes on serving.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from .errors import Phi3Error, is_integer
from .explore import explore_data, page
from .intervene import ablate_head, ablate_neuron, intervene

MAX_BODY = 64 * 1024  # bytes: a prompt of a view is at most MAX_TOKENS tokens anyway
CONTINUATION = 12  # new tokens of the greedy continuation


class Explorer:
    """The model, its tokenizer and the lock that serializes every use of them."""

    def __init__(self, model, tokenizer, name: str, prompt: str, chat: bool = False):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.lock = threading.Lock()
        self.first = self.run({"prompt": prompt, "chat": chat})["view"]

    def run(self, request: dict) -> dict:
        """The view and the continuation of one request, with its ablation; Phi3Error for a bad one."""
        if not isinstance(request, dict):
            raise Phi3Error(f"expected a JSON object with a prompt, got {type(request).__name__}")
        unknown = sorted(set(request) - {"prompt", "chat", "ablate"})
        if unknown:
            raise Phi3Error(f"unknown fields {unknown}; expected prompt, chat and ablate")
        prompt, chat = request.get("prompt"), request.get("chat", False)
        if not isinstance(chat, bool):
            raise Phi3Error(f"chat must be true or false, got {chat!r:.40}")
        edits = self.edits(request.get("ablate"))
        with self.lock, torch.no_grad():
            if edits is None:
                return self.answer(prompt, chat)
            with intervene(self.model, edits):
                return self.answer(prompt, chat)

    def answer(self, prompt, chat: bool) -> dict:
        # The view's KV-cache panel runs CONTINUATION greedy steps: they are the continuation.
        view = explore_data(self.model, self.tokenizer, prompt, chat, steps=CONTINUATION, name=self.name)
        new = [step["token"]["id"] for step in view["cache"][1:]]
        return {"view": view, "continuation": self.tokenizer.decode(new)}

    def edits(self, ablate) -> dict | None:
        """p3.intervene's edits for the request's "ablate" field (None: no ablation)."""
        if ablate is None:
            return None
        c = self.model.config
        if not isinstance(ablate, dict) or ablate.get("kind") not in ("head", "neuron"):
            raise Phi3Error(f'ablate must be {{"kind": "head" or "neuron", "layer": ..., ...}}, '
                            f'got {ablate!r:.80}')
        layer = ablate.get("layer")
        if not is_integer(layer) or not 0 <= layer < c.num_hidden_layers:
            raise Phi3Error(f"ablate: layer {layer!r:.20}: the model has {c.num_hidden_layers} layers, "
                            f"0..{c.num_hidden_layers - 1}")
        if ablate["kind"] == "head":
            head = ablate.get("head")
            if not is_integer(head) or not 0 <= head < c.num_attention_heads:
                raise Phi3Error(f"ablate: head {head!r:.20}: a layer has {c.num_attention_heads} heads, "
                                f"0..{c.num_attention_heads - 1}")
            return ablate_head(layer, head)
        neuron = ablate.get("neuron")
        if not is_integer(neuron) or not 0 <= neuron < c.intermediate_size:
            raise Phi3Error(f"ablate: neuron {neuron!r:.20}: the MLP has {c.intermediate_size} channels, "
                            f"0..{c.intermediate_size - 1}")
        return ablate_neuron(layer, neuron)


def handler(explorer: Explorer):
    """The request handler class for one Explorer."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] != "/":
                return self.reply(404, {"error": f"no page {self.path}; the view is at /"})
            self.reply(200, page(explorer.first, live=True), "text/html; charset=utf-8")

        def do_POST(self):
            if self.path != "/api/run":
                return self.reply(404, {"error": f"no endpoint {self.path}; POST /api/run"})
            try:
                size = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self.reply(411, {"error": "a POST needs a Content-Length"})
            if size > MAX_BODY:
                self.close_connection = True  # the body is not read: the connection cannot carry on
                return self.reply(413, {"error": f"the body is {size} bytes; at most {MAX_BODY}"})
            try:
                request = json.loads(self.rfile.read(size) or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return self.reply(400, {"error": f"the body is not JSON: {e}"})
            try:
                self.reply(200, explorer.run(request))
            except Phi3Error as e:
                self.reply(400, {"error": str(e)})

        def reply(self, status: int, body, kind: str = "application/json"):
            data = (body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):  # one quiet line a request, on stderr
            pass

    return Handler


def make_server(explorer: Explorer, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """The server, bound but not yet serving (port 0: any free port; server.server_address says which)."""
    try:
        return ThreadingHTTPServer((host, port), handler(explorer))
    except OSError as e:
        raise Phi3Error(f"serve: cannot listen on {host}:{port}: {e.strerror or e}") from None
