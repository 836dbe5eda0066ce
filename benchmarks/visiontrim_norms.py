"""How much `visiontrim`'s merge grows its complement tokens, on the benchmark host's real LLM inputs.

    python benchmarks/visiontrim_norms.py [--scenes 8] [--keep 32]

Runs ref-vlm-mini (DINOv2-S/14 + projector + Llama) through `mmc.apply(model, "visiontrim", keep=K)` on `detail`
scenes (the first question of each; the chat-template tokens `<|user|>`, `<|assistant|>` are excluded from the
question, which comes before the image in this template), for `merge="release"` (each of the 3 rounds adds the mean
of the tokens that joined a target) and `merge="mean"` (the same groups, their size-weighted means).
Prints, per scene, the mean norm of the complement tokens the LLM receives over the mean norm of the uncompressed
image tokens, and the min / mean / max over the scenes.
"""

from __future__ import annotations

import argparse

import torch
from mmcompress.evals.detail import make_scene, questions, render

import mmcompress as mmc


def norm_ratios(scenes: int, keep: int, merge: str) -> tuple[list[float], int]:
    """(complement-token norm / image-token norm (means over tokens), one value per scene; image tokens N)."""
    model, proc = mmc.zoo.load("ref-vlm-mini")
    lm = model.model.language_model
    got: list[torch.Tensor] = []
    hook = lm.register_forward_pre_hook(lambda m, a, kw: got.append(kw["inputs_embeds"]), with_kwargs=True)
    img_id = model.config.image_token_id
    template = [proc.tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>")]
    kd, kc = mmc.create("visiontrim", keep=keep).split(keep)
    out = []
    try:
        mmc.apply(model, "visiontrim", keep=keep, merge=merge, text_exclude_ids=template)
        for seed in range(scenes):
            scene = make_scene(seed)
            inp = proc(images=[render(scene)], text=[questions(scene)[0][1]], return_tensors="pt", padding=True)
            where = (inp["input_ids"][0] == img_id).nonzero().squeeze(1)  # [144] placeholder positions
            got.clear()
            with torch.no_grad(), mmc.disabled(model):
                model(**inp)
            full = got[0][0, where]  # [N, C] uncompressed image tokens
            got.clear()
            with torch.no_grad():
                model(**inp)
            comp = got[0][0, where[kd:keep]]  # [kc, C] the complement tokens (after the kd dominant ones)
            out.append(float(comp.norm(dim=-1).mean() / full.norm(dim=-1).mean()))
    finally:
        hook.remove()
        mmc.remove(model)
    return out, len(where)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--keep", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for merge in ("release", "mean"):
        r, n = norm_ratios(args.scenes, args.keep, merge)
        print(f"merge={merge!r} keep={args.keep} of {n}: complement / image-token norm min {min(r):.2f} mean "
              f"{sum(r) / len(r):.2f} max {max(r):.2f}  ({', '.join(f'{v:.2f}' for v in r)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
