"""cdpruner: conditional DPP (similarity x text relevance), greedy MAP selection."""

from __future__ import annotations

import pytest
import torch

import mmcompress as mmc
from mmcompress.compressors.cdpruner import greedy_dpp, relevance


def test_duplicates_are_avoided_when_relevance_is_flat():
    # every token equally relevant (r = 1): L = S; greedy picks 0, then token 1 (a copy of 0) has gain 0, token 2 has 1
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    text = torch.tensor([[[1.0, 1.0]]])
    assert torch.equal(relevance(x, text), torch.ones(1, 3))
    out = mmc.create("cdpruner", keep=2)(x, text=text)
    assert out.rep.tolist() == [[0, 2]] and torch.equal(out.x, x[:, [0, 2]])


def test_relevance_sign_and_conditional_gain_by_hand():
    # cos to the text [1, 0]: 1, 0, 0.6. negate (release): v = -1, 0, -0.6 -> r = 1e-6, 1 + 1e-6, 0.4 + 1e-6
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])
    text = torch.tensor([[1.0, 0.0]])  # [B, C] is one text token
    r = relevance(x, text.unsqueeze(1))
    torch.testing.assert_close(r, torch.tensor([[1e-6, 1 + 1e-6, 0.4 + 1e-6]]))
    assert mmc.create("cdpruner", keep=1)(x, text=text).rep.tolist() == [[1]]
    # then gain_j = r_j^2 (1 - S_1j^2): token 0: 1e-12, token 2: 0.16 * 0.36 -> token 2
    assert mmc.create("cdpruner", keep=2)(x, text=text).rep.tolist() == [[1, 2]]
    # the paper's sign: r = 1 + 1e-6, 1e-6, 0.6 + 1e-6 -> token 0 first
    assert mmc.create("cdpruner", keep=1, negate=False)(x, text=text).rep.tolist() == [[0]]
    # theta: r <- exp(theta / (2 (1 - theta)) r), still monotone in r
    torch.testing.assert_close(relevance(x, text.unsqueeze(1), theta=0.5), torch.exp(0.5 * r))


def test_greedy_dpp_is_the_greedy_log_determinant():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        f = torch.randn(2, 9, 12, generator=g)
        L = f @ f.transpose(1, 2)
        got = greedy_dpp(L, 5)
        for b in range(2):
            chosen: list[int] = []
            for _ in range(5):
                rest = [j for j in range(9) if j not in chosen]
                dets = [torch.logdet(L[b][chosen + [j]][:, chosen + [j]].double()) for j in rest]
                chosen.append(rest[int(torch.stack(dets).argmax())])
            assert got[b].tolist() == chosen


def test_exhausted_kernel_still_keeps_k_distinct_tokens():
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 20, 3, generator=g), torch.randn(1, 4, 3, generator=g)  # rank 3 < k
    out = mmc.create("cdpruner", keep=8)(x, text=text)
    assert out.rep.unique().numel() == 8 and torch.isfinite(out.x).all()
    # k = 1: the largest diagonal r_i^2 S_ii, i.e. the most relevant token
    assert mmc.create("cdpruner", keep=1)(x, text=text).rep.tolist() == [[int(relevance(x, text)[0].argmax())]]


def test_bad_options_and_missing_text():
    with pytest.raises(ValueError, match="theta"):
        mmc.create("cdpruner", theta=1.0)
    with pytest.raises(TypeError, match="negate"):
        mmc.create("cdpruner", negate=1)
    with pytest.raises(ValueError, match="text"):
        mmc.create("cdpruner", keep=2)(torch.randn(1, 6, 4))


def test_apply_llava_gets_the_question_after_the_projector():
    from test_vispruner import apply_matches_direct_call

    apply_matches_direct_call("cdpruner", keep=6, stage="projector")


def test_apply_qwen2_vl():
    from test_vispruner import apply_runs_on_qwen2_vl

    apply_runs_on_qwen2_vl("cdpruner", keep=5)
