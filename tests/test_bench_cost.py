"""Cost columns of `mmcompress bench`: exact prefill FLOPs, per-layer token counts of in-LLM methods, their
schedules per budget, the `resize` reference, `random` independent of the batch, and the report's budget marks."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from mmcompress.evals.cost import LLMShape, at_budget, inllm_schedule, layer_flops, prefill_flops, resize_grid

from tests.bench_fixtures import ToyTask, save_tiny_llava


def test_prefill_flops_hand_count():
    shape = LLMShape(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, gated=True, vocab=10)
    # Layer on T = 5 tokens (C = 8, H = 2, Hk = 1, D = 4, I = 16):
    #   q 2*5*8*(2*4) = 640, o 640, k 2*5*8*(1*4) = 320, v 320         -> 1920
    #   Q K^T 2*5*5*(2*4) = 400, A V 400                                -> 800
    #   gate, up, down 3 * 2*5*8*16 = 3 * 1280                          -> 3840      layer total 6560
    # Layer on T = 3: q 384, o 384, k 192, v 192 -> 1152; QK^T 144, AV 144 -> 288; MLP 3 * 768 = 2304 -> 3744
    # LM head on the last position: 2*8*10 = 160
    assert layer_flops(shape, 5) == 6560 and layer_flops(shape, 3) == 3744
    assert prefill_flops(shape, [5, 3]) == 6560 + 3744 + 160 == 10464
    ungated = LLMShape(**{**shape.__dict__, "gated": False})
    assert layer_flops(ungated, 5) == 6560 - 1280  # fc1, fc2: one MLP matmul fewer
    with pytest.raises(ValueError, match="layer_tokens: expected 2 counts"):
        prefill_flops(shape, [5])
    with pytest.raises(ValueError, match="T: expected an int token count"):
        layer_flops(shape, -1)


def test_prefill_flops_equal_torch_flop_counter():
    """An independent count: torch's FlopCounterMode over an eager GQA Llama prefill with logits for the last
    position only (what generate() runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "eager"  # SDPA's CPU kernel is not counted by FlopCounterMode
    model = transformers.LlamaForCausalLM(cfg).eval()
    shape = LLMShape.from_model(model)
    assert (shape.kv_heads, shape.head_dim, shape.gated) == (2, 8, True)
    for T in (1, 7, 19):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(inputs_embeds=torch.randn(1, T, 32), logits_to_keep=1)
        assert fc.get_total_flops() == prefill_flops(shape, [T] * 3)


def test_shape_from_config_names_what_is_missing():
    with pytest.raises(ValueError, match="hidden_size"):
        LLMShape.from_config(transformers.PretrainedConfig(num_attention_heads=2))


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    """A tiny LLaVA with a 4-layer decoder (16 image tokens) behind the bench's backend."""
    from mmcompress.evals.backends import VLMBackend

    d = save_tiny_llava(tmp_path_factory.mktemp("tiny4"), layers=4)
    return VLMBackend.load(str(d))


def test_inllm_rows_count_each_layer_and_their_flops(tiny4):
    be, samples = tiny4, ToyTask().samples()[:3]
    be.configure("fastv", 0.25, {"fastv_k": 1})  # layer 0 sees 16 image tokens, layers 1-3 keep round(16 * 0.25)
    rows = be.predict(samples, 2)
    for r in rows:
        assert r["layer_tokens"] == [16, 4, 4, 4] and r["tokens"] == 7.0
        assert r["prefill_flops"] == prefill_flops(be.shape, [r["text_tokens"] + m for m in [16, 4, 4, 4]])
    be.configure("pdrop", None, {"pdrop_layers": [1, 3], "pdrop_lambda": 0.5})  # int(16 * 0.5), int(16 * 0.25)
    assert [r["layer_tokens"] for r in be.predict(samples, 2)] == [[16, 8, 8, 4]] * 3
    be.configure("none", 1.0, {})
    none = be.predict(samples, 2)
    assert [r["layer_tokens"] for r in none] == [[16] * 4] * 3
    assert [r["text_tokens"] for r in none] == [r["text_tokens"] for r in rows]  # pruning never touches text


@pytest.mark.parametrize("method", ["fastv", "pdrop", "sparsevlm"])
def test_schedule_meets_the_budget_as_measured(tiny4, method):
    from mmcompress.evals.plan import setting_plan

    be, samples = tiny4, ToyTask().samples()[:4]
    keep, opts, info = setting_plan(method, 0.5, {}, be, samples[0])
    assert info["image_tokens"] == 16 and info["layers"] == 4 and info["within_budget"]
    be.configure(method, keep, opts)
    rows = be.predict(samples, 2)
    assert all(r["tokens"] == info["planned_tokens"] for r in rows)  # the plan is what the stage really did
    assert all(at_budget(r["tokens"], 8) for r in rows)
    assert setting_plan(method, 0.5, {SCHEDULE[method]: SCHEDULE_VALUE[method]}, be, samples[0])[2] is None


SCHEDULE = {"fastv": "fastv_k", "pdrop": "pdrop_layers", "sparsevlm": "sparsevlm_layers"}
SCHEDULE_VALUE = {"fastv": 2, "pdrop": [2], "sparsevlm": [1]}


def test_schedules_on_the_benchmark_host_shape():
    """144 image tokens, 8 layers (ref-vlm-mini v2) and LLaVA-1.5's 576 / 32."""
    s = inllm_schedule("fastv", 0.5, 144, 8)
    assert s.options == {"fastv_k": 2} and s.keep * 144 == pytest.approx(48) and s.planned == 72  # (2*144+6*48)/8
    s = inllm_schedule("fastv", 0.25, 144, 8)  # K = 2 would keep no token: K = 1, floor((36*8 - 144) / 7) = 20
    assert s.options == {"fastv_k": 1} and round(s.keep * 144) == 20 and s.reachable
    s = inllm_schedule("fastv", 0.125, 144, 8)  # layer 0 alone is 1/8 of the mean: out of reach
    assert not s.reachable and s.planned > 18
    assert inllm_schedule("fastv", 64, 576, 32).options == {"fastv_k": 2}  # the release's K at 64 tokens
    assert inllm_schedule("pdrop", 0.5, 576, 32).options["pdrop_layers"] == [8, 16, 24]
    for n, L in ((144, 8), (576, 32), (64, 4), (256, 12)):
        for keep in (0.75, 0.5, 0.25, 0.125, 0.0625):
            for m in ("fastv", "pdrop", "dart", "sparsevlm"):
                s = inllm_schedule(m, keep, n, L)
                assert (s.planned <= keep * n + 1e-9) == s.reachable or m == "sparsevlm"
                if s.reachable:
                    assert s.planned <= keep * n + 1e-9 and s.planned > 0.5 * keep * n
    with pytest.raises(ValueError, match="method"):
        inllm_schedule("tome", 0.5, 144, 8)
    with pytest.raises(ValueError, match="keep"):
        inllm_schedule("fastv", 0, 144, 8)


def test_resize_grid_and_inputs(tiny4):
    assert resize_grid(72, (12, 12)) == (8, 9) and resize_grid(36, (12, 12)) == (6, 6)
    assert resize_grid(18, (12, 12)) == (4, 4) and resize_grid(200, (12, 12)) == (12, 12)
    assert resize_grid(0.5, (12, 12)) == (1, 1)
    be, samples = tiny4, ToyTask().samples()[:3]
    be.configure("resize", 0.5, {})
    inputs = be.inputs_for(samples)
    assert tuple(inputs["pixel_values"].shape[-2:]) == (16, 24)  # 2 x 3 patches of 8 px: 6 <= 8 tokens
    rows = be.predict(samples, 2)
    assert all(r["tokens"] == 6 and r["layer_tokens"] == [6] * 4 for r in rows)
    enc = []
    h = be.vision.register_forward_hook(lambda m, a, o: enc.append(o.last_hidden_state.shape[1]))
    be.predict(samples, 1)
    h.remove()
    assert enc == [7]  # the encoder itself ran on 6 patches (+ CLS): resize saves the encoder's compute
    with pytest.raises(ValueError, match="option"):
        be.configure("resize", 0.5, {"mode": "nearest"})
    be.configure("none", 1.0, {})


def test_random_keeps_the_same_tokens_in_any_batch(tiny4):
    import mmcompress as mmc

    be, samples = tiny4, ToyTask().samples()[:9]
    be.configure("random", 0.25, {})
    kept = {}
    for chunk in (samples[:8], samples[8:], samples[::-1]):
        be.predict(chunk, 1)
        for (_, b, assign) in mmc.stats(be.model)["assign"]:
            kept.setdefault(chunk[b].id, []).append(assign.clone())
    assert all(len(v) == 2 and torch.equal(v[0], v[1]) for v in kept.values())
    assert len({tuple(v[0].tolist()) for v in kept.values()}) > 1  # different samples, different draws
    be.configure("none", 1.0, {})


def test_bench_random_rows_do_not_depend_on_the_batch_size(tmp_path):
    from mmcompress.evals.runner import BenchConfig, run

    d = save_tiny_llava(tmp_path / "m")
    rows = {}
    for bs in (8, 32):
        out = tmp_path / f"b{bs}"
        run(BenchConfig(model=str(d), tasks=["tests.bench_fixtures:ToyTask"], methods=[], keeps=[0.25],
                        batch_size=bs, out=out, progress=False, timing_repeats=0))
        recs = [r for r in map(__import__("json").loads, (out / "samples.jsonl").read_text().splitlines())
                if r["method"] == "random"]
        rows[bs] = [(r["id"], r["prediction"], r["tokens"], r["prefill_flops"]) for r in recs]
    assert rows[8] == rows[32] and len(rows[8]) == 23


def test_report_bolds_only_rows_at_their_budget():
    from mmcompress.evals.report import budget_pivot, pareto_figure, time_panel_stable

    def row(m, keep, acc, tokens, budget, spread=0.01):
        return {"task": "t", "method": m, "keep": keep, "accuracy": acc, "stderr": 0.01, "tokens": tokens,
                "budget_tokens": budget, "at_budget": "" if m == "none" else at_budget(tokens, budget),
                "delta_vs_random": acc - 0.5 if m not in ("none", "random") else math.nan,
                "within_2se_of_random": False, "prefill_gflops": tokens / 10, "prefill_ms": tokens / 5,
                "ratio_spread": spread, "n": 100}

    rows = [row("none", "1", 0.9, 144, 144), row("random", "0.25", 0.5, 36, 36), row("good", "0.25", 0.7, 36, 36),
            row("inllm", "0.25", 0.8, 36.4, 36), row("resize", "0.25", 0.6, 36, 36)]
    md = budget_pivot(rows)
    assert "| good | **0.700** |" in md and "| inllm | 0.800 ↑36.4 |" in md and "| random | 0.500 |" in md
    assert "25% (36 tokens)" in md
    assert time_panel_stable(rows) and len(pareto_figure(rows).axes) == 3  # tokens, GFLOPs, ms
    rows[2]["ratio_spread"] = 0.2
    assert not time_panel_stable(rows) and len(pareto_figure(rows).axes) == 2


def test_timing_ratio_is_fastest_over_fastest_with_a_split_half_check():
    from mmcompress.evals.timing import TimingConfig, fastest_ratio, split_half_spread

    setting, none = [3.0, 2.0, 9.0, 2.2], [5.0, 4.0, 4.4, 30.0]  # a loaded repeat only ever adds time
    assert fastest_ratio(setting, none) == 0.5
    # even pairs: 3 / 4.4 = 0.682; odd pairs: 2 / 4 = 0.5; half the gap over 0.5
    assert split_half_spread(setting, none) == pytest.approx((3 / 4.4 - 0.5) / 2 / 0.5)
    assert math.isnan(split_half_spread([1.0], [1.0]))
    with pytest.raises(ValueError, match="timing_repeats"):
        TimingConfig(repeats=0)


def test_a_disturbed_setting_gets_extra_pairs_until_its_halves_agree():
    from mmcompress.evals.timing import TimingConfig, describe_machine, run_pairs, split_half_spread

    def scripted(setting: list[float]):
        runs: dict[str, list[float]] = {"set": [], "none": []}

        def pair(r: int) -> None:
            runs["none"].append(10.0)
            runs["set"].append(setting[r] if r < len(setting) else 5.0)
        return runs, pair

    cfg = TimingConfig(repeats=3, max_spread=0.025)
    runs, pair = scripted([5.0, 5.0, 5.0])  # halves agree: 3 pairs and no more
    assert run_pairs(pair, runs, cfg) == 3 and len(runs["set"]) == 3
    # the even pairs (0, 2) were disturbed: 6 / 10 against 5 / 10; pairs 3 and 4 bring an even pair at 5.0
    runs, pair = scripted([6.0, 5.0, 6.0])
    assert split_half_spread([6.0, 5.0, 6.0], [10.0] * 3) > 0.025
    assert run_pairs(pair, runs, cfg) == 5 and split_half_spread(runs["set"], runs["none"]) == 0
    runs, pair = scripted([6.0, 5.0] * 10)  # never agrees: stops at 3 x repeats
    assert run_pairs(pair, runs, cfg) == 9 == cfg.max_repeats
    with pytest.raises(ValueError, match="max_spread"):
        TimingConfig(max_spread=0)

    timings = [{"cpu": "AMD EPYC", "cpus": 2, "load1": 0.5, "repeats": 7, "pairs": 7},
               {"cpu": "AMD EPYC", "cpus": 2, "load1": 2.25, "repeats": 7, "pairs": 11}]
    assert describe_machine(timings) == ("timed on AMD EPYC (2 logical CPUs); 1-minute load average 0.50-2.25 before "
                                         "the settings' measurements; 1 of 2 settings measured with extra pairs")
    assert describe_machine([{"repeats": 7}]) is None


def test_trio_schedule_scales_the_release_readme_shape(monkeypatch):
    """With its encoder stage: e tokens in, e / 3 from layer L / 2 on (the release's 96 -> 32 at layer 16 of 32);
    without it: the in-LLM stage alone, its layer lowered until a token fits the budget."""
    from mmcompress.evals import cost

    monkeypatch.setattr(cost, "_trio_encoder_stage", lambda: True)
    s = inllm_schedule("trio", 64, 576, 32)  # (16 x 96 + 16 x 32) / 32 = 64: the release's own schedule
    assert (s.keep, s.options, s.planned, s.reachable) == (32, {"trio_layer": 16, "trio_encoder_keep": 96}, 64, True)
    s = inllm_schedule("trio", 0.25, 144, 8)  # 36 of 144 on 8 layers: 54 in, 18 from layer 4
    assert (s.keep, s.options, s.planned) == (18, {"trio_layer": 4, "trio_encoder_keep": 54}, 36)
    monkeypatch.setattr(cost, "_trio_encoder_stage", lambda: False)
    s = inllm_schedule("trio", 0.5, 144, 8)  # layer 4 leaves (576 - 576) / 4 = 0: layer 3, (576 - 432) / 5 = 28
    assert (s.keep, s.options, s.reachable) == (28, {"trio_layer": 3}, True) and s.planned <= 72
    assert not inllm_schedule("trio", 0.125, 144, 8).reachable  # layer 0 alone is 1/8 of the mean
