"""A stand-in for the `vllm` command on a CPU machine: `vllm serve` and `vllm bench serve`, enough of each for
moekern e2e's serve grid and `moekern sweep` to run end to end (tests/test_knob_grid_command.py).

`vllm serve MODEL --port P ...`: an HTTP server on 127.0.0.1:P answering GET /health, POST /v1/completions
(each request is one "step": while the gate log is not paused, one gate-log record per layer is appended to
$MOEKERN_GATE_LOG_DIR/gate_log.rank0.jsonl with loads set by the current skew) and, only with
VLLM_SERVER_DEV_MODE=1 (as vLLM 0.26 mounts it), POST /collective_rpc with moekern_gate_log and
moekern_routing_skew (the skew must parse, and the server must have started with MOEKERN_ROUTING_SKEW, as the
plugin requires). SIGTERM ends it. `vllm bench serve ...`: a few completions against --base-url, then the
result JSON at --result-dir/--result-filename, throughput lower for skewed routing."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LOADS = {"uniform": [10] * 8, "hot": [44, 6, 6, 6, 5, 5, 4, 4], "cold": [0, 12, 12, 12, 11, 11, 11, 11]}


def _loads(describe: str) -> list[int]:
    if describe.startswith("hot:") and float(describe.split(":")[2].split("@")[0]) < 0.125:
        return LOADS["cold"]
    return LOADS["hot"] if describe.startswith(("hot:", "zipf:")) else LOADS["uniform"]


def serve(argv: list[str]) -> int:
    from moekern.vllm.config import parse_skew

    port = int(argv[argv.index("--port") + 1])
    start = os.environ.get("MOEKERN_ROUTING_SKEW")
    state = {"skew": parse_skew(start).describe() if start else None, "paused": False, "step": 0}
    gate_dir = os.environ.get("MOEKERN_GATE_LOG_DIR")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(200 if self.path == "/health" else 404, {})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path == "/v1/completions":
                with lock:
                    if gate_dir and not state["paused"]:
                        Path(gate_dir).mkdir(parents=True, exist_ok=True)
                        with open(Path(gate_dir) / "gate_log.rank0.jsonl", "a") as fh:
                            for layer in range(2):
                                fh.write(json.dumps({"schema": "moekern.gatelog/1", "step": state["step"],
                                                     "layer": layer, "rank": 0, "num_tokens": 40, "phase": "decode",
                                                     "top_k": 2, "expert_counts": _loads(state["skew"] or "uniform"),
                                                     "time": time.time()}) + "\n")
                    state["step"] += 1
                return self._send(200, {"choices": [{"text": "x"}]})
            if self.path == "/collective_rpc" and os.environ.get("VLLM_SERVER_DEV_MODE") == "1":
                method, args = body.get("method"), body.get("args", [])
                if method == "moekern_gate_log":
                    state["paused"] = str(args[0]).lower() in ("false", "0")
                    return self._send(200, {"results": [{"gate_log": not state["paused"], "steps": state["step"]}]})
                if method == "moekern_routing_skew":
                    try:
                        if start is None:
                            raise ValueError("started without MOEKERN_ROUTING_SKEW")
                        state["skew"] = parse_skew(args[0], name="skew").describe()
                    except ValueError as exc:
                        return self._send(500, {"error": str(exc)})
                    return self._send(200, {"results": [{"skew": state["skew"], "layers": 2, "biases_rewritten": 2}]})
                return self._send(500, {"error": f"Method {method!r} is not implemented."})
            self._send(404, {})

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    signal.signal(signal.SIGTERM, lambda s, f: threading.Thread(target=server.shutdown).start())
    print(f"INFO fake vllm serve on {port}", flush=True)
    server.serve_forever()
    return 0


def bench(argv: list[str]) -> int:
    a = {k: v for k, v in zip(argv, argv[1:]) if k.startswith("--")}
    url = a["--base-url"] + "/v1/completions"
    for _ in range(3):
        req = urllib.request.Request(url, data=b'{"prompt": "x"}', headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
    conc = int(a["--max-concurrency"])
    thr = 100.0 * conc
    Path(a["--result-dir"]).mkdir(parents=True, exist_ok=True)
    (Path(a["--result-dir"]) / a["--result-filename"]).write_text(json.dumps(
        {"duration": 1.0, "completed": int(a["--num-prompts"]), "failed": 0, "output_throughput": thr,
         "request_throughput": thr / 128, "mean_ttft_ms": 20.0, "mean_tpot_ms": 5.0, "total_input_tokens": 100,
         "max_concurrency": conc}))
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["serve"]:
        sys.exit(serve(args[1:]))
    if args[:2] == ["bench", "serve"]:
        sys.exit(bench(args[2:]))
    print(f"fake vllm: unsupported {args}", file=sys.stderr)
    sys.exit(2)
