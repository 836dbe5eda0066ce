"""The plugin on vLLM's (CPU) engine with a tiny random LLaVA-NeXT (anyres tiles on 112 px, image_newline), server
setting through `--hf-overrides`: a compressed image is M kept tokens + one newline, a per-request override, keep=1
equal to plain vLLM, agreement with `mmc.apply` in transformers, mixed batches. One plugin engine and one plain-vLLM
engine for the module."""

from __future__ import annotations

import pytest
import served
import tiny
from conftest import run_engine

# placeholder run uncompressed = base tile 64 + unpadded rows x cols + one newline per row: 112x112 on the 112x224
# pinpoint (64 + 8 x 8 + 8); 150x120 on 224x224 (64 + 12 x 16 + 12); 200x90 on 112x224 (64 + 8 x 16 + 8)
A = {"prompt": tiny.prompt(seed=0, placeholder="<image>"), "images": [[0, 112, 112]]}
B = {"prompt": tiny.prompt(seed=1, n_words=9, placeholder="<image>"), "images": [[1, 150, 120]]}
C = {"prompt": tiny.prompt(seed=2, n_words=4, placeholder="<image>"), "images": [[2, 200, 90]]}
TEXT = {"prompt": "<|im_start|>user w5 w9 w13 <|im_end|> <|im_start|>assistant"}
RUN = {"A": 136, "B": 268, "C": 200}
N = {"A": 128, "B": 256, "C": 192}  # without the newlines: what the compressor sees
SERVER = {"method": "divprune", "keep": 0.25}  # server-wide, through hf_overrides


kw = tiny.request_kw


CALLS = {
    "server": [A, B, C],
    "tome": [dict(A, **kw("tome", 0.5)), dict(B, **kw("tome", 0.5)), dict(C, **kw("tome", 0.5))],
    "pool_int": [dict(A, **kw("pool", 40)), dict(C, **kw("pool", 40))],
    "keep1": [dict(A, **kw("tome", 1.0)), dict(B, **kw("tome", 1.0)), dict(C, **kw("tome", 1.0))],
    "mixed": [dict(B, **kw("tome", 0.5)), TEXT, A, dict(C, **kw("tome", 1.0))],
    "text": [TEXT],
    **served.calls([A, B], served.ANYRES_SOME, "img"),
    "no_grid": [dict(A, **kw("dycoke", 0.5))],
    "mixed_methods": served.mixed([(B, "cdpruner", 16), (A, "visionzip", 0.5), (TEXT, None, 1.0),
                                   (A, "prumerge", 6)]),
}
NAMES = list(CALLS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("next")
    model = str(tiny.build_llava_next(root / "model"))
    out = run_engine(tmp_path_factory.mktemp("plug"), model, [CALLS[n] for n in NAMES],
                     engine={"hf_overrides": {"mmcompress": SERVER}})
    plain = run_engine(tmp_path_factory.mktemp("plain"), model, [[A, B, C]], env={"MMCOMPRESS_VLLM": "0"})
    return model, dict(zip(NAMES, out["results"], strict=True)), plain["results"][0]


def test_keep1_equals_plain_vllm(runs):
    _, got, plain = runs
    assert got["keep1"] == plain  # prompt ids, generated ids, first-step log-probs: bit for bit
    for r, k in zip(plain, "ABC", strict=True):
        assert r["prompt_token_ids"].count(tiny.token_id("<image>")) == RUN[k]


@pytest.mark.parametrize("name,keys,kept", [("server", "ABC", lambda n: round(0.25 * n)),
                                            ("tome", "ABC", lambda n: round(0.5 * n)),
                                            ("pool_int", "AC", lambda n: 40)])
def test_prompt_is_kept_tokens_plus_one_newline(runs, name, keys, kept):
    _, got, plain = runs
    ref = dict(zip("ABC", plain, strict=True))
    for r, k in zip(got[name], keys, strict=True):
        m = kept(N[k]) + 1
        assert r["prompt_token_ids"].count(tiny.token_id("<image>")) == m
        assert len(r["prompt_token_ids"]) == len(ref[k]["prompt_token_ids"]) - (RUN[k] - m)
        assert len(r["token_ids"]) == 5


def test_mixed_batch_equals_single_runs(runs):
    _, got, _ = runs
    singles = [got["tome"][1], got["text"][0], got["server"][0], got["keep1"][2]]
    tiny.assert_same_runs(got["mixed"], singles)


@pytest.mark.parametrize("name,method,keep", [("server", "divprune", 0.25), ("tome", "tome", 0.5),
                                              ("pool_int", "pool", 40), ("keep1", None, 1.0)])
def test_agrees_with_mmc_apply_in_transformers(runs, name, method, keep):
    model_dir, got, _ = runs
    tiny.assert_apply_agrees(model_dir, method, keep, CALLS[name], got[name])


@pytest.mark.parametrize("name,method,keep", served.names(served.ANYRES_SOME, "img"))
def test_scored_and_text_methods_shorten_and_agree_with_mmc_apply(runs, name, method, keep):
    """Scores of every tile packed like the features (newlines removed), the question: kept tokens + one newline,
    and outputs equal `mmc.apply` in transformers."""
    model_dir, got, plain = runs
    served.assert_shorter(got[name], plain[:2], [RUN["A"], RUN["B"]],
                          [served.kept(N[k], keep) + 1 for k in "AB"], tiny.token_id("<image>"))
    tiny.assert_apply_agrees(model_dir, method, keep, CALLS[name], got[name])


def test_batch_of_different_methods_equals_single_runs(runs):
    _, got, _ = runs
    singles = [got["img:cdpruner"][1], got["img:visionzip"][0], got["text"][0], got["img:prumerge"][0]]
    tiny.assert_same_runs(got["mixed_methods"], singles)


def test_method_needing_a_grid_is_refused_on_anyres_images(runs):
    _, got, _ = runs
    assert "error" in got["no_grid"] and "grid" in got["no_grid"]["error"], got["no_grid"]
