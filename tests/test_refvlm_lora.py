"""The ref-vlm LoRA: what training computes (`LoRALinear` in the LLM) equals the weights folded at load time."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from mmcompress.zoo.refvlm import merge_lora
from tests.script_module import load_script


@pytest.fixture(scope="module")
def train_script():
    return load_script("scripts/train_projector.py")


def test_trained_lora_equals_the_folded_weights(train_script):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    lm = transformers.LlamaModel(cfg).eval()
    plain = copy.deepcopy(lm)
    loras = train_script.add_lora(lm, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8.0)
    assert len(loras) == 6
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(lm(ids).last_hidden_state, plain(ids).last_hidden_state)  # B = 0: starts as the base
        for m in loras.values():
            m.lora_B.normal_()
        trained = lm(ids).last_hidden_state
        assert merge_lora(plain, train_script.lora_state(loras)) == 6
        torch.testing.assert_close(plain(ids).last_hidden_state, trained, atol=1e-5, rtol=1e-5)


def test_merge_lora_rejects_what_does_not_fit():
    lm = transformers.LlamaModel(transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8,
                                                          num_hidden_layers=1, num_attention_heads=2))
    bad = {"layers.0.self_attn.q_proj.lora_A": torch.zeros(2, 8), "layers.0.self_attn.q_proj.lora_B": torch.zeros(9, 2),
           "layers.0.self_attn.q_proj.lora_scale": torch.tensor(1.0)}
    with pytest.raises(ValueError, match="do not fit"):
        merge_lora(lm, bad)
    with pytest.raises(ValueError, match="not a Linear"):
        merge_lora(lm, {"layers.0.lora_A": torch.zeros(1, 1), "layers.0.lora_B": torch.zeros(1, 1),
                        "layers.0.lora_scale": torch.tensor(1.0)})
