"""What compressing Whisper's encoder output saves: decoder time per clip batch, interleaved, same run.

    python benchmarks/whisper_speed.py --out runs/whisper_speed/whisper_speed.csv

The compressors run on the encoder's OUTPUT (the frames the decoder cross-attends to), so the encoder itself costs
the same with and without compression; what shrinks is every decoder step's cross-attention (and its K/V
projection at the first step). Each repetition times the encoder once and then `generate()` of every setting in
turn on the same 5 LibriVox clips, with the number of new tokens fixed (EOS ignored) so every setting decodes the
same tokens. Rows: setting, frames kept, p20/p50/p80 ms of the encoder and of the decoder part of `generate()`
(generate minus the encoder), and the decoder ratio to `none` measured in the same repetitions.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import mmcompress as mmc
from mmcompress import zoo
from mmcompress.zoo.data import load_librivox

sys.path.insert(0, str(Path(__file__).resolve().parent))
from csv_rows import write_rows  # noqa: E402

SETTINGS = (("none", 1.0), ("audio_merge", 0.5), ("audio_merge", 0.25), ("pool", 0.25))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per clip (EOS ignored)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/whisper_speed/whisper_speed.csv"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, proc = zoo.load("whisper-tiny.en")
    model.eval()
    clips = load_librivox()
    feats = proc([c.audio for c in clips], sampling_rate=16000, return_tensors="pt").input_features  # [5, 80, 3000]
    gen = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False)
    enc_ms: list[float] = []
    gen_ms: dict[str, list[float]] = {f"{m}@{k}": [] for m, k in SETTINGS}
    frames: dict[str, int] = {}
    with torch.inference_mode():
        for name, keep in SETTINGS:  # warm-up, and the frame counts
            mmc.remove(model)
            if name != "none":
                mmc.apply(model, name, keep=keep)
            model.generate(feats, **gen)
            frames[f"{name}@{keep}"] = mmc.stats(model)["tokens_out"][0] if name != "none" else \
                model.config.max_source_positions
        for _ in range(a.reps):
            mmc.remove(model)
            t0 = time.perf_counter()
            model.get_encoder()(feats)
            enc_ms.append((time.perf_counter() - t0) * 1e3)
            for name, keep in SETTINGS:
                mmc.remove(model)
                if name != "none":
                    mmc.apply(model, name, keep=keep)
                t0 = time.perf_counter()
                model.generate(feats, **gen)
                gen_ms[f"{name}@{keep}"].append((time.perf_counter() - t0) * 1e3)
    mmc.remove(model)
    enc = np.array(enc_ms)
    base = np.array(gen_ms["none@1.0"]) - enc
    versions = f"torch {torch.__version__}; mmcompress {mmc.__version__}; {platform.processor() or platform.machine()}"
    rows = []
    for key, ms in gen_ms.items():
        dec = np.array(ms) - enc  # [reps] decoder part of generate(), same repetitions as the base
        rows.append({"setting": key, "frames": frames[key], "clips": len(clips), "new_tokens": a.new_tokens,
                     "encoder_ms_p20": np.percentile(enc, 20), "encoder_ms_p50": np.percentile(enc, 50),
                     "encoder_ms_p80": np.percentile(enc, 80), "decoder_ms_p20": np.percentile(dec, 20),
                     "decoder_ms_p50": np.percentile(dec, 50), "decoder_ms_p80": np.percentile(dec, 80),
                     "decoder_ratio_p50": float(np.median(dec / base)), "threads": a.threads, "versions": versions})
    write_rows(a.out, rows, digits=2)
    for r in rows:
        print(f"{r['setting']:>18}  frames {r['frames']:>5}  encoder p50 {r['encoder_ms_p50']:7.1f} ms  "
              f"decoder p50 {r['decoder_ms_p50']:7.1f} ms  (x{r['decoder_ratio_p50']:.2f} of none)")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
