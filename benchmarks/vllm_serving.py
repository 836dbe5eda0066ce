"""Serving benchmark of `vllm serve` with the mmcompress plugin on a Qwen2-VL-2B-shaped model: TTFT, requests/s and
the encoder's share, per method and keep, against the same images resized to the budget, in ONE server run.

The model is a random Qwen2-VL with Qwen2-VL-2B-Instruct's widths (text: hidden 1536, MLP 8960, 12 heads, 2 KV
heads, vocab 151936, M-RoPE [16, 24, 24], rope theta 1e6, tied embeddings; vision: 1280 wide, 16 heads, MLP x4,
merger to 1536, 14 px patches, 2 x 2 merge) and both towers cut in depth (default: text 28 -> 4 layers, vision 32 -> 4
blocks: 1/7 and 1/8; `--text-layers` / `--vision-layers`), built offline with a word-level tokenizer of 151936
ids. 448 x 448 px images give 256 image tokens (of ~271 in the prompt). Each request picks its method and keep
through `mm_processor_kwargs`, so every setting runs on the same engine, interleaved round by round (the order
rotated each round); the `resize` rows send the same images downsampled so that the UNcompressed prompt has the
compressed token count (keep 0.5: 448 x 224 px, 128 tokens; keep 0.25: 224 x 224 px, 64 tokens): the encoder then
also runs on fewer patches, the bound that compression after the encoder cannot pass. Every request carries a new
random image (no processor, encoder or prefix cache hits) and decodes `--max-tokens` tokens (eos ignored).

The server runs with benchmarks/vllm_timer.py's timers, which time vLLM's encoder step (tower + compressor), the vision
blocks and the LLM's decoder layers inside the engine process (one line per call): the encoder's share of TTFT is
encoder ms / TTFT at concurrency 1, and the full-depth figures are estimated from the per-layer times (cost is linear
in depth): TTFT + (32/v - 1) x blocks ms + (28/t - 1) x LLM-layers ms (prefill), labelled `_est`.

    .venv-vllm/bin/python benchmarks/vllm_serving.py --out runs/vllm/serving.csv

Rows (benchmarks/csv_rows.py), per (method, keep, concurrency): ttft_ms (p20/p50/p80 over requests), req_per_s
(p20/p50/p80 over rounds), encoder_ms (per image), plugin_ms (per image: the encoder step minus the vision tower, i.e.
the compressor and the scores it reads), encoder_share (p50 encoder / p50 TTFT), encoder_wall_share
(encoder seconds / wall seconds); at concurrency 1 also vit_blocks_ms, llm_prefill_ms, ttft_ms_est_full_depth,
encoder_share_est_full_depth and best_ttft_ratio (encoder share + (1 - share) x the LLM part's ratio measured on the
resize row of that budget: the TTFT ratio of a method that compressed for free). `ratio_p50` = p50 over the
uncompressed row's (TTFT: < 1 is faster; req/s: > 1 is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import glob
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests_vllm"))

import tiny  # noqa: E402
import vllm_timer  # noqa: E402
from csv_rows import quantiles, write_rows  # noqa: E402

FULL_TEXT_LAYERS, FULL_VISION_BLOCKS = 28, 32  # Qwen2-VL-2B-Instruct
VOCAB = 151936
TEXT = dict(vocab_size=VOCAB, hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
            num_key_value_heads=2, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
VISION = dict(embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2)
PROMPT = "w3 w14 w15 w92 w65 w35 w89 w79"
UNIT = 28  # px per merged token side (14 px patches, 2 x 2 merge)


def build_model(out: Path, text_layers: int, vision_layers: int, image_side: int) -> Path:
    """Save the random Qwen2-VL-2B-shaped model (depth cut) with a 151936-id word-level tokenizer under `out`."""
    out = tiny.build_qwen2_vl(out, text_kw=dict(TEXT, num_hidden_layers=text_layers),
                              vision_kw=dict(VISION, depth=vision_layers), max_side=image_side)
    _tokenizer(VOCAB).save_pretrained(out)  # tiny's has 256 ids: a full vocab, so every sampled id decodes
    return out


def _tokenizer(vocab: int):
    """tests_vllm/tiny.py's word-level tokenizer and chat template, with `vocab` ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = tiny.SPECIALS + [f"w{i}" for i in range(vocab - len(tiny.SPECIALS))]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(names)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   unk_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": tiny.SPECIALS[1:]})
    fast.chat_template = (tiny.CHAT_TEMPLATE.replace("{{ IMG }}", "<|vision_start|> <|image_pad|> <|vision_end|>")
                          .replace("{{ VID }}", "<|vision_start|> <|video_pad|> <|vision_end|>"))
    return fast


def resized(side: int, keep: float) -> tuple[int, int]:
    """(width, height) px whose uncompressed token count is round(keep x tokens of a `side` px square image): the
    most nearly square grid of exactly that many merged tokens (448 px, 0.25: 224 x 224; 0.5: 448 x 224)."""
    g = side // UNIT
    m = max(1, round(keep * g * g))
    h = max(d for d in range(1, int(m ** 0.5) + 1) if m % d == 0)
    return m // h * UNIT, h * UNIT


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_url(seed: int, side: int, size: tuple[int, int]) -> str:
    from PIL import Image

    img = tiny.image(seed, (side, side))
    if size != (side, side):
        img = img.resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _one(client, url: str, body: dict) -> tuple[float, int]:
    """(seconds to the first streamed token, prompt tokens) of one streamed chat request."""
    t0 = time.perf_counter()
    ttft, prompt_tokens = None, -1
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=1200) as r:
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


def _times(prefix: str) -> list[tuple[str, float, float, int]]:
    """(kind, start unix s, seconds, n) of every call vllm_timer.py timed, from all processes."""
    out = []
    for path in glob.glob(prefix + ".*"):
        for line in open(path):
            kind, t0, dt, n = line.split()
            out.append((kind, float(t0), float(dt), int(n)))
    return out


def _csv_list(text: str, kind, name: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected a comma-separated list, got {text!r}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/vllm/serving.csv"))
    ap.add_argument("--model", type=Path, default=None,
                    help="the model's directory: served as is if it holds a config.json (its depths are read from "
                         "it), else built there and kept (default: built in a temporary folder, removed at the end)")
    ap.add_argument("--text-layers", type=int, default=4, help=f"LLM layers (Qwen2-VL-2B: {FULL_TEXT_LAYERS})")
    ap.add_argument("--vision-layers", type=int, default=4, help=f"vision blocks (Qwen2-VL-2B: {FULL_VISION_BLOCKS})")
    ap.add_argument("--methods", default="tome,divprune,visionzip")
    ap.add_argument("--keeps", default="0.5,0.25", help="keeps below 1 (the uncompressed row is always run)")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--requests", default="2,8", help="requests per setting and round, one per concurrency")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--image", type=int, default=448, help="image side in px (448: 256 image tokens)")
    ap.add_argument("--no-resize", action="store_true", help="leave out the resized-image rows")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--table", type=Path, default=None, help="only print the tables of this CSV (no run)")
    args = ap.parse_args()
    if args.table is not None:
        import csv

        with open(args.table) as f:
            _print_tables(list(csv.DictReader(f)))
        return
    methods = _csv_list(args.methods, str, "--methods")
    keeps = _csv_list(args.keeps, float, "--keeps")
    concs = _csv_list(args.concurrency, int, "--concurrency")
    nreq = _csv_list(args.requests, int, "--requests")
    if any(not 0 < k < 1 for k in keeps):
        raise ValueError(f"--keeps: expected fractions in (0, 1), got {args.keeps!r}")
    if len(nreq) != len(concs) or min(nreq + concs) < 1:
        raise ValueError(f"--requests: expected one positive count per concurrency {concs}, got {args.requests!r}")
    if args.image % UNIT or args.image < 2 * UNIT:
        raise ValueError(f"--image: expected a multiple of {UNIT} px >= {2 * UNIT}, got {args.image}")
    if min(args.text_layers, args.vision_layers, args.rounds) < 1:
        raise ValueError("--text-layers, --vision-layers, --rounds: expected >= 1")
    side = args.image
    # (method, keep, image size): uncompressed; each method at each keep; the same images resized to each budget
    settings = [("none", 1.0, (side, side))] + [(m, k, (side, side)) for m in methods for k in keeps]
    settings += [] if args.no_resize else [("resize", k, resized(side, k)) for k in keeps]

    tmp = Path(tempfile.mkdtemp(prefix="mmc-vllm-bench-"))
    model = args.model or tmp / "model"
    if (model / "config.json").exists():
        cfg = json.loads((model / "config.json").read_text())
        args.text_layers = cfg.get("text_config", cfg)["num_hidden_layers"]
        args.vision_layers = cfg["vision_config"]["depth"]
    else:
        t_build = time.time()
        build_model(model, args.text_layers, args.vision_layers, side)
        print(f"model built in {time.time() - t_build:.0f} s: {model}", flush=True)
    print(f"text {args.text_layers} of {FULL_TEXT_LAYERS} layers, vision {args.vision_layers} of "
          f"{FULL_VISION_BLOCKS} blocks", flush=True)
    port, log, times = _port(), tmp / "serve.log", str(tmp / "times")
    # vllm_timer.py's timers in every process of the server (vLLM spawns its engine and worker)
    pypath = [str(vllm_timer.sitecustomize_dir(tmp / "site")), str(Path(__file__).resolve().parent)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), MMC_VLLM_TIMES=times,
               PYTHONPATH=os.pathsep.join(pypath + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    # = `vllm serve` (the OpenAI server's module; vllm-cpu 0.32.0's `vllm` CLI fails on its distribution name)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", args.dtype, "--enforce-eager", "--max-model-len", "2048",
           "--served-model-name", "bench", "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0",
           "--trust-request-mm-kwargs", "--max-num-seqs", str(max(concs))]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    seed = [1000]

    def bodies(setting: tuple, n: int) -> list[dict]:
        method, keep, size = setting
        out = []
        for _ in range(n):
            seed[0] += 1
            mm = {"mmcompress_method": method, "mmcompress_keep": keep} if method not in ("none", "resize") else {}
            out.append({"model": "bench", "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
                        "stream": True, "stream_options": {"include_usage": True}, "mm_processor_kwargs": mm,
                        "messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": _image_url(seed[0], side, size)}},
                            {"type": "text", "text": PROMPT}]}]})
        return out

    ttft: dict = {}
    rps: dict = {}
    ptok: dict = {}
    windows: dict = {}  # (setting, conc) -> [(t0, t1, requests)]
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
        asyncio.run(_round(url, bodies(settings[0], 2), 2))  # warm-up
        t_run = time.time()
        for r in range(args.rounds):
            order = settings[r % len(settings):] + settings[:r % len(settings)]
            for c, n in zip(concs, nreq, strict=True):
                for s in order:
                    w0 = time.time()
                    wall, t, p = asyncio.run(_round(url, bodies(s, n), c))
                    windows.setdefault((s, c), []).append((w0, time.time(), n))
                    ttft.setdefault((s, c), []).extend(t)
                    rps.setdefault((s, c), []).append(n / wall)
                    ptok[(s, c)] = p[0]
                    print(f"round {r} conc {c} {s[0]} {s[1]} {s[2][0]}x{s[2][1]}: {n / wall:.3f} req/s, "
                          f"TTFT p50 {1e3 * quantiles(t + t)[1]:.0f} ms, prompt {p[0]} tokens", flush=True)
        print(f"measured in {time.time() - t_run:.0f} s", flush=True)
    finally:
        tiny.stop(proc)
        if args.model is None:
            shutil.rmtree(model, ignore_errors=True)  # ~1.6 GB of random weights

    rows = _rows(args, settings, concs, ttft, rps, ptok, windows, _times(times))
    write_rows(args.out, rows)
    _print_tables(rows)
    print(f"wrote {args.out}")


def _rows(args, settings, concs, ttft, rps, ptok, windows, calls) -> list[dict]:
    """CSV rows: measured metrics per (setting, concurrency), the derived shares and the full-depth estimates."""
    import torch
    import vllm

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    tl, vl = args.text_layers, args.vision_layers

    def inside(s, c, kind, prefill=False):
        """Calls of `kind` timed while (s, c) ran: [(seconds, n)]."""
        return [(dt, n) for k, t0, dt, n in calls if k == kind and (not prefill or n > 1)
                and any(a <= t0 <= b for a, b, _ in windows[(s, c)])]

    stats: dict = {}
    for c in concs:
        for s in settings:
            nreq = sum(n for _, _, n in windows[(s, c)])
            wall = sum(b - a for a, b, _ in windows[(s, c)])
            enc = [dt / n for dt, n in inside(s, c, "encoder") for _ in range(n)]  # per image
            # the plugin's own time (compressor, scores): an encoder step minus the tower's calls inside it
            steps = [(t0, dt, n) for k, t0, dt, n in calls if k == "encoder"
                     and any(a <= t0 <= b for a, b, _ in windows[(s, c)])]
            own = [(dt - sum(v for k, t1, v, _ in calls if k == "vit" and t0 <= t1 <= t0 + dt)) / n
                   for t0, dt, n in steps for _ in range(n)]
            d = dict(ttft_ms=[1e3 * x for x in ttft[(s, c)]], req_per_s=rps[(s, c)],
                     encoder_ms=[1e3 * x for x in enc] or [float("nan")],
                     plugin_ms=[1e3 * x for x in own] or [float("nan")])
            st = {k: quantiles(v if len(v) > 1 else v + v) for k, v in d.items()}
            t, e = st["ttft_ms"][1], st["encoder_ms"][1]
            st.update(encoder_share=e / t, encoder_wall_share=sum(enc) / wall)
            if c == 1:  # one request at a time: per-request layer times (prefill: steps of more than 1 token)
                blocks = 1e3 * sum(dt for dt, _ in inside(s, c, "vit_block")) / nreq
                llm = 1e3 * sum(dt for dt, _ in inside(s, c, "llm_layer", prefill=True)) / nreq
                e_full = e + (FULL_VISION_BLOCKS / vl - 1) * blocks
                t_full = t + (e_full - e) + (FULL_TEXT_LAYERS / tl - 1) * llm
                st.update(vit_blocks_ms=blocks, llm_prefill_ms=llm, ttft_ms_est_full_depth=t_full,
                          encoder_share_est_full_depth=e_full / t_full)
            stats[(s, c)] = (st, d)

    def llm_part(st: dict, full: bool) -> float:  # TTFT minus the encoder (ms, p50)
        t = st["ttft_ms_est_full_depth"] if full else st["ttft_ms"][1]
        return t * (1 - (st["encoder_share_est_full_depth"] if full else st["encoder_share"]))

    rows = []
    common = dict(device=device, dtype=args.dtype, vllm=vllm.__version__, torch=torch.__version__,
                  python=platform.python_version(), text_layers=tl, vision_layers=vl)
    ratio_of = ("ttft_ms", "req_per_s", "encoder_ms", "vit_blocks_ms", "llm_prefill_ms", "ttft_ms_est_full_depth")
    for c in concs:
        base = stats[(settings[0], c)][0]
        for s in settings:
            st, d = stats[(s, c)]
            rs = next((stats[(x, c)][0] for x in settings if x[0] == "resize" and x[1] == s[1]), None)
            if c == 1 and s[0] not in ("none", "resize") and rs is not None:
                # a method that compressed for free: keep 1's encoder + the LLM part of the resize row (same tokens)
                for suffix, full in (("", False), ("_est_full_depth", True)):
                    share = base["encoder_share" + suffix]
                    st["best_ttft_ratio" + suffix] = share + (1 - share) * llm_part(rs, full) / llm_part(base, full)
            for metric, v in st.items():
                q = v if isinstance(v, tuple) else ("", v, "")
                b = base.get(metric)
                ratio = q[1] / (b[1] if isinstance(b, tuple) else b) if metric in ratio_of else ""
                rows.append({"bench": "vllm_serving", "method": s[0], "keep": s[1], "concurrency": c,
                             "image": f"{s[2][0]}x{s[2][1]}", "prompt_tokens": ptok[(s, c)], "metric": metric,
                             "p20": q[0], "p50": q[1], "p80": q[2], "ratio_p50": ratio,
                             "samples": len(d[metric]) if metric in d else "", **common})
    return rows


def _print_tables(rows: list[dict]) -> None:
    """The markdown tables docs/vllm.md shows, from the CSV rows (as written, or read back with --table)."""
    num = ("keep", "p20", "p50", "p80", "ratio_p50")
    rows = [{k: (float(v) if k in num and v != "" else v) for k, v in r.items()} for r in rows]
    get = {(r["method"], r["keep"], int(r["concurrency"]), r["metric"]): r for r in rows}
    settings = list(dict.fromkeys((r["method"], r["keep"], r["image"]) for r in rows))
    concs = list(dict.fromkeys(int(r["concurrency"]) for r in rows))

    def f(key, metric, fmt="{:.0f}", field="p50"):
        r = get.get(key + (metric,))
        return "" if r is None or r[field] == "" else fmt.format(r[field])

    print("\n| concurrency | method | keep | image px | prompt tokens | TTFT p20 / p50 / p80 ms | TTFT ratio | "
          "requests/s p50 | req/s ratio | encoder ms p50 | encoder share of TTFT | encoder share of wall time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in concs:
        for m, k, image in settings:
            key = (m, k, c)
            r = get[key + ("ttft_ms",)]
            print(f"| {c} | {m} | {k:g} | {image} | {r['prompt_tokens']} | "
                  f"{r['p20']:.0f} / {r['p50']:.0f} / {r['p80']:.0f} | {r['ratio_p50']:.2f} | "
                  f"{f(key, 'req_per_s', '{:.3f}')} | {f(key, 'req_per_s', '{:.2f}', 'ratio_p50')} | "
                  f"{f(key, 'encoder_ms')} | {f(key, 'encoder_share', '{:.2f}')} | "
                  f"{f(key, 'encoder_wall_share', '{:.2f}')} |")
    if 1 in concs:
        print("\n| method | keep | vision blocks ms | LLM prefill ms | best TTFT ratio (free compression) | "
              "TTFT est. full depth ms | ratio | encoder share est. | best ratio est. |")
        print("|---|---|---|---|---|---|---|---|---|")
        for m, k, _ in settings:
            key = (m, k, 1)
            print(f"| {m} | {k:g} | {f(key, 'vit_blocks_ms')} | {f(key, 'llm_prefill_ms')} | "
                  f"{f(key, 'best_ttft_ratio', '{:.2f}')} | {f(key, 'ttft_ms_est_full_depth')} | "
                  f"{f(key, 'ttft_ms_est_full_depth', '{:.2f}', 'ratio_p50')} | "
                  f"{f(key, 'encoder_share_est_full_depth', '{:.2f}')} | "
                  f"{f(key, 'best_ttft_ratio_est_full_depth', '{:.2f}')} |")


if __name__ == "__main__":
    main()
