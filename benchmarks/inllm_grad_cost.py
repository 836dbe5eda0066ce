"""What the in-LLM backward pass costs: prefill time and peak memory of TRIO vs FastV vs no pruning (CPU).

Each (model, method) runs in its own process (peak RSS is per process), on random Llama decoders built from configs,
one thread, the stage used directly on `LlamaForCausalLM` (no VLM around it). FastV prunes at the same layer to the
same count, so the difference is the scoring: FastV's one attention row vs TRIO's re-run layer + backward.

    python benchmarks/inllm_grad_cost.py            # tiny and mid-size rows, markdown table
    python benchmarks/inllm_grad_cost.py --repeats 5

Time: the fastest of `--repeats` prefills (after a warm-up), as process CPU time (one thread), under
`torch.inference_mode()`. Memory: the process's peak RSS (model, inputs and the prefills together); the difference
between two methods is what one method's prefill holds at its peak beyond the other's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODELS = {
    # name: (LlamaConfig kwargs, prompt length, image tokens, prune layer, kept)
    "tiny": (dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2), 160, 144, 4, 32),
    "mid": (dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12), 616, 576, 6, 64),
}


def child(model: str, method: str, repeats: int) -> dict:
    import torch
    import transformers

    from mmcompress.inllm.fastv import FastVRule
    from mmcompress.inllm.stage import InLLM
    from mmcompress.inllm.trio import TRIORule

    torch.set_num_threads(1)
    kw, L, n_img, P, keep = MODELS[model]
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, attn_implementation="sdpa")).eval()
    ids = torch.randint(3, kw["vocab_size"], (1, L), generator=torch.Generator().manual_seed(0))
    img = torch.zeros(1, L, dtype=torch.bool)
    img[0, L - n_img - 8: L - 8] = True  # bos + words, the image, 8 question words
    stage = None
    if method != "none":
        rule = TRIORule(P, keep) if method == "trio" else FastVRule(P, 1.0 - keep / n_img)
        stage = InLLM(lm.model.layers, rule, decoder=lm.model, head=lm.lm_head)
        stage.attach()
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.process_time()
        with torch.inference_mode():
            if stage is None:
                lm(ids)
            else:
                with stage.armed(img):
                    lm(ids)
        times.append(time.process_time() - t0)
    assert all(p.grad is None for p in lm.parameters())
    kept = n_img if stage is None else n_img - stage.last_removed[0]
    return {"ms": 1e3 * min(times[1:]), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "kept": kept}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="tiny,mid")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.repeats)))
        return
    print("| model | method | prefill ms (CPU, 1 thread) | extra ms vs FastV | peak RSS MB | extra MB vs FastV |")
    print("|---|---|---|---|---|---|")
    for model in a.models.split(","):
        rows = {}
        for method in ("none", "fastv", "trio"):
            out = subprocess.run([sys.executable, __file__, "--repeats", str(a.repeats), "--child", model, method],
                                 capture_output=True, text=True, check=True).stdout
            rows[method] = json.loads(out.strip().splitlines()[-1])
        fv = rows["fastv"]
        for method, r in rows.items():
            print(f"| {model} | {method} (kept {r['kept']}) | {r['ms']:.1f} | {r['ms'] - fv['ms']:+.1f} | "
                  f"{r['peak_mb']:.0f} | {r['peak_mb'] - fv['peak_mb']:+.0f} |")


if __name__ == "__main__":
    main()
