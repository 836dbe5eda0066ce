"""Runs ONE vLLM engine over a list of calls and writes what the tests compare (a script: vLLM spawns workers).

    python tests_vllm/engine.py JOB.json OUT.json

JOB: {"model": DIR, "engine": {LLM kwargs}, "calls": [[request, ...], ...]}; a request is
{"prompt": str, "images": [[seed, width, height(, kind, cell)], ...], "videos": [[seed, frames, width, height(, fps)],
...], "mm_processor_kwargs": {...} | null, "max_tokens": int, "logprobs": int} (`tiny.image` for kind and cell).
OUT: per call, per request: prompt_token_ids, token_ids, first-step logprobs {id: logprob}, or the error message when
vLLM refused the request.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny  # noqa: E402


def _request(r: dict) -> dict:
    images = [tiny.image(s, (w, h), *kind) for s, w, h, *kind in r.get("images", [])]
    videos = [(tiny.video(s, f, (w, h)), tiny.video_metadata(f, *fps)) for s, f, w, h, *fps in r.get("videos", [])]
    out = {"prompt": r["prompt"]}
    data = {}
    if images:
        data["image"] = images if len(images) > 1 else images[0]
    if videos:
        data["video"] = videos if len(videos) > 1 else videos[0]
    if data:
        out["multi_modal_data"] = data
    if r.get("mm_processor_kwargs"):
        out["mm_processor_kwargs"] = r["mm_processor_kwargs"]
    return out


def main(job_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    job = json.load(open(job_path))
    t0 = time.time()
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              **job.get("engine", {}))
    up = time.time() - t0
    results = []
    for call in job["calls"]:
        sps = [SamplingParams(temperature=0, max_tokens=r.get("max_tokens", 5), logprobs=r.get("logprobs", 5))
               for r in call]
        try:
            outs = llm.generate([_request(r) for r in call], sps, use_tqdm=False)
        except Exception as e:  # a refused request: the tests check the message
            results.append({"error": f"{type(e).__name__}: {e}"})
            continue
        res = []
        for o in outs:
            c = o.outputs[0]
            first = {str(k): v.logprob for k, v in (c.logprobs[0] if c.logprobs else {}).items()}
            res.append({"prompt_token_ids": list(o.prompt_token_ids), "token_ids": list(c.token_ids),
                        "first_logprobs": first})
        results.append(res)
    json.dump({"startup_s": up, "results": results}, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
