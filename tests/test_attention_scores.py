"""attention_row_scores / QKCapture against eager attention (explicit softmax of the full map)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmcompress.compressors.attention_scores import QKCapture, attention_row_scores, find_qk_linears


def eager_rows(q, k, rows, scale=None):
    """Reference: full [B, H, N, N] softmax map, then pick rows and average. q, k: [B, H, N, D]."""
    D = q.shape[-1]
    s = D**-0.5 if scale is None else scale
    rows = [rows] if isinstance(rows, int) else list(rows)
    att = (q.double() @ k.double().transpose(-1, -2) * s).softmax(-1)  # [B, H, Nq, N]
    return att[:, :, rows].mean(dim=(1, 2)).float()  # [B, N]


@pytest.mark.parametrize("N,rows,chunk", [(7, 0, 64), (577, 0, 64), (131, [0, 5, 9, 130], 3), (50, [-1, -2], 1)])
def test_matches_eager(N, rows, chunk):
    g = torch.Generator().manual_seed(N)
    q = torch.randn(2, 3, N, 16, generator=g)
    k = torch.randn(2, 3, N, 16, generator=g)
    got = attention_row_scores(q, k, rows, chunk=chunk)
    want = eager_rows(q, k, rows)
    assert got.shape == (2, N) and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5
    torch.testing.assert_close(got.sum(1), torch.ones(2), atol=1e-5, rtol=0)


def test_flat_layout_gqa_and_per_sample_rows():
    g = torch.Generator().manual_seed(0)
    B, H, Hk, N, D = 2, 4, 2, 33, 8
    q = torch.randn(B, N, H * D, generator=g)
    k = torch.randn(B, N, Hk * D, generator=g)
    rows = torch.tensor([[1, 2], [30, 31]])
    got = attention_row_scores(q, k, rows, num_heads=H, num_kv_heads=Hk)
    q4 = q.view(B, N, H, D).transpose(1, 2)
    k4 = k.view(B, N, Hk, D).transpose(1, 2).repeat_interleave(H // Hk, dim=1)  # HF repeat_kv order
    for b in range(B):
        want = eager_rows(q4[b : b + 1], k4[b : b + 1], rows[b].tolist())
        assert (got[b] - want[0]).abs().max() <= 1e-5


def test_key_mask():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 10, 4, generator=g), torch.randn(1, 2, 10, 4, generator=g)
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 6:] = False
    got = attention_row_scores(q, k, 0, key_mask=mask)
    want = eager_rows(q[:, :, :, :], k[:, :, :6], 0)
    assert got[0, 6:].abs().max() == 0
    assert (got[:, :6] - want).abs().max() <= 1e-5


def test_bad_inputs():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="rows"):
        attention_row_scores(q, q, 5)
    with pytest.raises(ValueError, match="num_heads"):
        attention_row_scores(torch.randn(1, 5, 8), torch.randn(1, 5, 8), 0)
    with pytest.raises(TypeError, match="q"):
        attention_row_scores(q.long(), q, 0)
    with pytest.raises(ValueError, match="k"):
        attention_row_scores(q, torch.randn(1, 2, 5, 3), 0)


class TinyAttn(nn.Module):
    """An SDPA attention layer with HF-style q_proj/k_proj/v_proj names."""

    def __init__(self, C=24, H=3):
        super().__init__()
        self.num_attention_heads = H
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x):
        B, N, C = x.shape
        H = self.num_attention_heads

        def split(t):
            return t.view(B, N, H, C // H).transpose(1, 2)

        o = nn.functional.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                                       split(self.v_proj(x)))
        return o.transpose(1, 2).reshape(B, N, C)


def test_capture_hf_layer_without_output_attentions():
    torch.manual_seed(0)
    attn = TinyAttn()
    block = nn.Sequential(nn.LayerNorm(24), attn)
    x = torch.randn(2, 19, 24)
    with QKCapture(block) as cap:  # finds the attention inside the block, reads num_attention_heads
        block(x)
    assert len(attn.q_proj._forward_hooks) == 0  # hooks removed
    h = block[0](x)
    q = attn.q_proj(h).view(2, 19, 3, 8).transpose(1, 2)
    k = attn.k_proj(h).view(2, 19, 3, 8).transpose(1, 2)
    want = eager_rows(q, k, 0)
    assert (cap.scores(0) - want).abs().max() <= 1e-5


def test_capture_real_dinov2_layout():
    """HF Dinov2 (random weights, SDPA) vs the same model's eager attention weights."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=28, patch_size=7)
    torch.manual_seed(0)
    model = transformers.Dinov2Model(cfg).eval()
    px = torch.randn(2, 3, 28, 28)
    with QKCapture(model.encoder.layer[-1].attention) as cap:
        model(pixel_values=px)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(pixel_values=px, output_attentions=True).attentions[-1]  # [B, H, N, N]
    want = att[:, :, 0].mean(1)
    assert (cap.scores(0) - want).abs().max() <= 1e-5


def test_find_qk_errors():
    with pytest.raises(ValueError, match="attn"):
        find_qk_linears(nn.Linear(3, 3))
    with pytest.raises(RuntimeError, match="nothing captured"):
        QKCapture(TinyAttn()).scores()


def test_encoder_signals_follow_the_declaration():
    """heads="single": one softmax over all channels (PruMerge); heads="mean": per-head rows averaged; keys as
    metric, all channels or averaged over heads (VisionZip)."""
    from mmcompress.compressors.attention_scores import encoder_signals
    from mmcompress.compressors.base import EncoderNeeds

    g = torch.Generator().manual_seed(0)
    B, N, H, D = 2, 7, 3, 4
    q, k = torch.randn(B, N, H * D, generator=g), torch.randn(B, N, H * D, generator=g)
    s, m = encoder_signals(q, k, EncoderNeeds(heads="single", metric="keys"), 0, num_heads=H)
    want = torch.softmax(q[:, :1] @ k.transpose(1, 2) / (H * D) ** 0.5, -1)[:, 0]
    torch.testing.assert_close(s, want)
    assert m is k
    s, m = encoder_signals(q, k, EncoderNeeds(metric="keys_mean"), 0, num_heads=H)
    qh, kh = q.view(B, N, H, D).transpose(1, 2), k.view(B, N, H, D).transpose(1, 2)
    torch.testing.assert_close(s, torch.softmax(qh[:, :, :1] @ kh.transpose(-1, -2) / D ** 0.5, -1)[:, :, 0].mean(1))
    torch.testing.assert_close(m, kh.mean(1))
    assert encoder_signals(q, k, EncoderNeeds(), 0, num_heads=H)[1] is None
    with pytest.raises(ValueError, match="heads"):
        EncoderNeeds(heads="max")
    with pytest.raises(ValueError, match="metric"):
        EncoderNeeds(metric="values")
