"""PixelPrune on a rendered text page: encoder and prefill CPU time saved on a small Qwen2-VL (random weights).

    python benchmarks/pixelprune_page.py [--repeats 5] [--tau 0.0]

A 448 x 644 page (PIL's default font, black text on white, a title and paragraphs), made into Qwen2-VL's processor
rows (patch 14, 2 x 2 merge, CLIP normalisation); a Qwen2-VL with an 8-block ViT (width 256) and a 4-layer LLM
(width 256). Timing: one thread, the process's CPU time, baseline and pixelprune interleaved, fastest of the
repeats. "encoder" is the model's get_image_features call (PixelPrune's selection included), "prefill" a full
forward (encoder + LLM). Prints the kept counts and the times as CSV.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers as T
from PIL import Image, ImageDraw, ImageFont

import mmcompress as mmc
from mmcompress.compressors.pixelprune import QWEN2_MEAN, QWEN2_STD

TEXT = ("PixelPrune drops image patch blocks that a two-dimensional predictor reproduces, before the vision "
        "encoder, so the ViT runs on fewer patches. Documents and screenshots are mostly background: ")


def page(h: int = 644, w: int = 448) -> torch.Tensor:
    """[3, h, w] in [0, 1]: a title and wrapped paragraphs."""
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((24, 20), "Quarterly report", fill="black", font=ImageFont.load_default(size=22))
    f = ImageFont.load_default(size=12)
    y, words = 64, (TEXT * 8).split()
    while y < h - 40 and words:
        line = ""
        while words and d.textlength(line + words[0], font=f) < w - 48:
            line += words.pop(0) + " "
        d.text((24, y), line, fill="black", font=f)
        y += 18 if words and len(line) > 20 else 36
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float().view(h, w, 3) / 255
    return x.permute(2, 0, 1).contiguous()


def rows(img: torch.Tensor, patch: int = 14, merge: int = 2, T_: int = 2):
    """Qwen2-VL processor rows [N, 3 * T * P * P] and grid [1, 3]."""
    C, H, W = img.shape
    m, s = torch.tensor(QWEN2_MEAN).view(3, 1, 1), torch.tensor(QWEN2_STD).view(3, 1, 1)
    x = ((img - m) / s).unsqueeze(0).repeat(T_, 1, 1, 1)
    gh, gw = H // patch, W // patch
    x = x.view(T_, C, gh // merge, merge, patch, gw // merge, merge, patch).permute(2, 5, 3, 6, 1, 0, 4, 7)
    return x.reshape(gh * gw, -1), torch.tensor([[1, gh, gw]])


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    vc = dict(depth=8, embed_dim=256, hidden_size=256, num_heads=4, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, in_channels=3)
    tc = dict(vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, head_dim=64,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]})
    cfg = T.Qwen2VLConfig(vision_config=vc, text_config=tc, image_token_id=100, video_token_id=101,
                          vision_start_token_id=103, vision_end_token_id=104)
    return T.Qwen2VLForConditionalGeneration(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tau", type=float, default=0.0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    pv, grid = rows(page())
    n = int(grid.prod()) // 4
    ids = torch.tensor([[1, 5, 6, 103] + [100] * n + [104] + list(range(10, 40))])
    inp = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_grid_thw=grid,
               mm_token_type_ids=(ids == 100).int())
    m = model()

    def enc() -> None:
        m.model.get_image_features(pv, grid)

    def pre() -> None:
        m(**inp)

    best = {}
    with torch.inference_mode():
        for _ in range(a.repeats):
            for arm in ("none", "pixelprune"):
                if arm == "pixelprune":
                    mmc.apply(m, "pixelprune", tau=a.tau)
                for part, fn in (("encoder", enc), ("prefill", pre)):
                    t0 = time.process_time()
                    fn()
                    dt = (time.process_time() - t0) * 1e3
                    best[arm, part] = min(best.get((arm, part), dt), dt)
                if arm == "pixelprune":
                    st = mmc.stats(m)
                    mmc.remove(m)
    print(f"patches,{pv.shape[0]},kept_patches,{st['encoder_patches_out']},image_tokens,{n},kept_tokens,"
          f"{st['tokens_out'][0]},select_ms,{st['select_ms']:.2f}")
    print("part,none_ms,pixelprune_ms,speedup")
    for part in ("encoder", "prefill"):
        b, p = best["none", part], best["pixelprune", part]
        print(f"{part},{b:.1f},{p:.1f},{b / p:.2f}")


if __name__ == "__main__":
    main()
