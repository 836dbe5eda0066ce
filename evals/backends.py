"""Backends of `mmcompress bench`: a model that answers `Sample`s under a compression setting, with timings.

Every backend has the same two calls, so the runner does not care what the model is:

    backend.configure(method, keep, options)     # "none" = uncompressed; else mmcompress.apply(model, method, ...)
    rows = backend.predict(samples, max_new_tokens)    # VLMs also take gen=GenerationSettings (sampling, beams)
    # one dict per sample: prediction, tokens (media tokens entering the LLM; in-LLM methods: mean over its layers),
    # encode_ms, compress_ms, prefill_ms, decode_ms (this sample's share of its batch: batch time / batch size),
    # peak_mem_mb; VLMs also text_tokens, layer_tokens (image tokens each LLM layer processed), prefill_flops

`configure("resize", keep)` is the downsampling reference: no compressor, the image itself resized so that the encoder
yields the budget's token count (`resize_inputs`).

`load_backend(model, modality)` picks the backend of a task's modality: image tasks -> `VLMBackend` (this module),
audio -> `mmcompress.evals.asr`, encoder -> `mmcompress.evals.knn`.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmcompress.evals.cost import budget_tokens
from mmcompress.evals.generation import GenerationSettings, batch_seed
from mmcompress.evals.tasks import Sample

__all__ = ["VLMBackend", "llm_media_tokens", "load_backend", "model_fingerprint", "peak_memory", "timed_generate",
           "resize_inputs", "BUILTIN_MODELS"]

# Built-in names of `--model` and the modality they serve.
BUILTIN_MODELS = {"ref-vlm": "image", "ref-vlm-mini": "image", "whisper-tiny.en": "audio", "dinov2-s14": "encoder"}
_MODALITY_MODULES = {"audio": "mmcompress.evals.asr", "encoder": "mmcompress.evals.knn"}
_VISION_ATTRS = ("vision_tower", "visual", "vision_model", "vision_encoder")


def _dtype(name: str) -> Any:
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype: expected one of {sorted(table)}, got {name!r}")
    return table[name]


def load_backend(model: str, modality: str, device: str = "cpu", dtype: str = "float32") -> Any:
    """The backend serving `modality` with `model`.

    Args:
        model: A built-in name (``ref-vlm``, ``whisper-tiny.en``, ``dinov2-s14``), a local HF model directory, or a
            hub id (loaded with ``AutoModelForImageTextToText``/``AutoProcessor``; offline only from a local path).
        modality: The task's modality (``"image"``, ``"audio"``, ``"encoder"``).
        device: Torch device string.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
    """
    if modality in _MODALITY_MODULES:
        return importlib.import_module(_MODALITY_MODULES[modality]).load_backend(model, device=device, dtype=dtype)
    if modality != "image":
        raise ValueError(f"modality: expected image, audio or encoder, got {modality!r}")
    if model in BUILTIN_MODELS and BUILTIN_MODELS[model] != "image":
        raise ValueError(f"model: {model!r} is a {BUILTIN_MODELS[model]} model; image tasks need a VLM "
                         f"(ref-vlm, ref-vlm-mini or a local HF VLM directory)")
    _dtype(dtype)
    return VLMBackend.load(model, device=device, dtype=dtype)


def model_fingerprint(model: str) -> str:
    """A short id of the weights behind `model`, so that a resumed run never mixes two different models' samples:
    the trained projector's hash for ref-vlm, the hash of config + weight file names and sizes for a directory."""
    import hashlib

    if model == "ref-vlm":
        from mmcompress.zoo.refvlm import projector_asset_path

        h = hashlib.sha256()
        for f in sorted(projector_asset_path().parent.glob("refvlm_*.safetensors")):  # projector (+ any adapter)
            if f.name.startswith("refvlm_mini"):
                continue  # ref-vlm-mini's weights, not ref-vlm's
            h.update(f.name.encode() + f.read_bytes())
        return "ref-vlm:" + h.hexdigest()[:16]
    if model == "ref-vlm-mini":
        from mmcompress.zoo.refvlm_mini import tokenizer_asset_path, weights_asset_path

        h = hashlib.sha256()
        for f in (weights_asset_path(), tokenizer_asset_path()):
            h.update(f.name.encode() + (f.read_bytes() if f.is_file() else b"missing"))
        return "ref-vlm-mini:" + h.hexdigest()[:16]
    path = Path(model)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.iterdir()):
            if f.is_file():
                h.update(f"{f.name}:{f.stat().st_size}".encode())
                if f.name == "config.json":
                    h.update(f.read_bytes())
        return "dir:" + h.hexdigest()[:16]
    return model


def peak_memory(device: Any, reset: bool = False) -> float:
    """Peak memory in MiB since the last reset: CUDA max allocated, else the process's peak RSS (VmHWM).

    On Linux, writing "5" to ``/proc/self/clear_refs`` resets VmHWM, so the CPU figure is per batch, not per process.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(dev)
            return 0.0
        return torch.cuda.max_memory_allocated(dev) / 2**20
    if reset:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        return 0.0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Clock:
    """Wall-clock of the media encoder (forward hooks on `vision`, any module) and of every generated token (a
    stopping criterion), so one ``generate()`` splits into encode / compress / prefill / decode."""

    def __init__(self, vision: Any, device: Any) -> None:
        self.vision, self.device = vision, device
        self.encode_s = 0.0
        self._t0 = 0.0
        self.first_token: float | None = None  # wall-clock when the first token was generated
        self._handles: list[Any] = []

    def sync(self) -> None:
        import torch

        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> _Clock:
        if self.vision is not None:
            self._handles.append(self.vision.register_forward_pre_hook(self._pre))
            self._handles.append(self.vision.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, *_: Any) -> None:
        self.sync()
        self._t0 = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.sync()
        self.encode_s += time.perf_counter() - self._t0

    def stopping_criterion(self) -> Any:
        from transformers import StoppingCriteria

        clock = self

        class _Stamp(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                import torch

                if clock.first_token is None:
                    clock.sync()
                    clock.first_token = time.perf_counter()
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        return _Stamp()


def timed_generate(model: Any, inputs: dict[str, Any], encoder: Any, device: Any, **gen: Any) -> tuple[Any, dict]:
    """``model.generate(**inputs, **gen)`` timed (greedy unless `gen` says otherwise, e.g.
    `GenerationSettings.generate_kwargs`): returns (output ids, {"encode_s", "first_token_s", "total_s",
    "peak_mem_mb"}); first_token_s runs from the call to the first generated token (encode + compress + prefill)."""
    import torch

    gen = {"do_sample": False, **gen}
    peak_memory(device, reset=True)
    with torch.inference_mode(), _Clock(encoder, device) as clock:
        clock.sync()
        t0 = time.perf_counter()
        out = model.generate(**inputs, stopping_criteria=[clock.stopping_criterion()], **gen)
        clock.sync()
        t_end = time.perf_counter()
    first = clock.first_token if clock.first_token is not None else t_end
    return out, {"encode_s": clock.encode_s, "first_token_s": first - t0, "total_s": t_end - t0,
                 "peak_mem_mb": peak_memory(device)}


def per_sample(t: dict[str, float], batch: int, stats: dict[str, Any]) -> dict[str, float]:
    """One sample's share (batch time / batch size, in ms) of a `timed_generate` batch; compress time from
    `mmcompress.stats`, prefill = time to the first token minus encode and compress."""
    compress_s = float(stats.get("compress_ms", 0.0)) / 1e3
    share = 1e3 / batch
    return {"encode_ms": t["encode_s"] * share, "compress_ms": compress_s * share,
            "prefill_ms": max(t["first_token_s"] - t["encode_s"] - compress_s, 0.0) * share,
            "decode_ms": (t["total_s"] - t["first_token_s"]) * share, "peak_mem_mb": t["peak_mem_mb"]}


def _find_vision(model: Any) -> Any:
    for owner in (model, getattr(model, "model", None)):
        for attr in _VISION_ATTRS:
            mod = getattr(owner, attr, None) if owner is not None else None
            if mod is not None:
                return mod
    return None


def llm_media_tokens(st: dict[str, Any], input_ids: Any, image_token_id: int | None, B: int) -> list[float]:
    """Media tokens the LLM processed per sample, from the wrapper's stats of the last call (`mmc.stats`; empty for
    an unwrapped model): tokens entering the LLM for encoder-side compressors, and for in-LLM methods (FastV,
    PyramidDrop, SparseVLM, DART) their AVERAGE over the LLM's layers (``inllm_layer_tokens``), the budget those
    methods' papers compare at. Without stats: the image placeholders of `input_ids` [B, L]. Several media items per
    sample: the batch mean."""
    if st.get("inllm_layer_tokens"):
        tokens = [round(sum(per) / len(per), 2) for per in st["inllm_layer_tokens"]]
    elif st.get("tokens_out") is not None:
        tokens = [float(o) for o in st["tokens_out"]]
    elif image_token_id is not None:
        tokens = [float(n) for n in input_ids.eq(image_token_id).sum(1).tolist()]
    else:
        tokens = [0.0] * B
    if len(tokens) != B:  # adapters count per media item; with several items per sample, record the batch mean
        tokens = [round(sum(tokens) / B, 2)] * B
    return tokens


class VLMBackend:
    """A Hugging Face VLM (ref-vlm or any model `mmcompress.apply` supports) answering image questions (greedy unless
    `predict` is given other `GenerationSettings`).

    Args:
        model: The model (eval mode).
        processor: Its processor. ref-vlm's takes the bare question and applies its own template; HF processors
            get a one-turn chat (image + prompt) through their chat template when they have one.
        device: Torch device.
    """

    def __init__(self, model: Any, processor: Any, device: str = "cpu") -> None:
        self.model, self.processor, self.device = model, processor, device
        self.image_token_id = getattr(model.config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(model.config, "image_token_index", None)
        self.vision = _find_vision(model)
        self.method, self.keep = "none", 1.0
        self.timing_cache: dict[Any, Any] = {}  # kept uncompressed encoder outputs of timing batches
        self.encoder_memo: Any = None  # `use_encoder_memo`: predict() batches reuse the tower's output
        self._resize_hook: Any = None
        try:
            from mmcompress.evals.cost import LLMShape

            self.shape: Any = LLMShape.from_model(model)
        except ValueError:  # not a decoder config we can count: no FLOPs column
            self.shape = None

    @classmethod
    def load(cls, model: str, device: str = "cpu", dtype: str = "float32") -> VLMBackend:
        """Load a built-in or local/hub HF VLM (see `load_backend`)."""
        if model in ("ref-vlm", "ref-vlm-mini"):
            from mmcompress import zoo

            m, proc = zoo.load(model)
        else:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            path = Path(model)
            hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
            if not path.is_dir() and not hub_id:
                raise ValueError(f"model: {model!r} is neither a built-in name ({', '.join(BUILTIN_MODELS)}), a "
                                 f"local model directory, nor a hub id (owner/name)")
            try:
                proc = AutoProcessor.from_pretrained(model)
                m = AutoModelForImageTextToText.from_pretrained(model, dtype=_dtype(dtype))
            except OSError as e:  # offline hub id, incomplete directory
                raise ValueError(f"model: cannot load {model!r} ({e})") from e
        m = m.to(device=device, dtype=_dtype(dtype)).eval()
        return cls(m, proc, device)

    def use_encoder_memo(self, on: bool = True, max_bytes: int = 4 << 30) -> None:
        """From now on `predict` runs each batch's vision tower once and replays it for later settings on the same
        pixels (`mmcompress.evals.encoder_memo`; exact: the answers do not change); ``on=False`` drops it."""
        if not on or self.vision is None:
            self.encoder_memo = None
            return
        from mmcompress.evals.encoder_memo import EncoderMemo

        self.encoder_memo = EncoderMemo(self.vision, max_bytes=max_bytes)

    def configure(self, method: str, keep: float | int, options: dict[str, Any] | None = None) -> None:
        """Compress with `method` at `keep` from now on (``"none"``: the unwrapped model)."""
        import mmcompress as mmc

        mmc.remove(self.model)
        if self._resize_hook is not None:
            self._resize_hook.remove()
            self._resize_hook = None
        self.method, self.keep = method, keep
        if method == "resize":
            if options:
                raise ValueError(f"option: the resize reference takes no options, got {sorted(options)}")
            budget_tokens(keep, 1)  # the budget is checked here; the grid is chosen per batch (`resize_inputs`)
            if self.vision is not None and "interpolate_pos_encoding" in inspect.signature(
                    self.vision.forward).parameters:  # e.g. CLIP: position table resampled for the smaller grid
                self._resize_hook = self.vision.register_forward_pre_hook(
                    lambda _m, a, kw: (a, {**kw, "interpolate_pos_encoding": True}), with_kwargs=True)
        elif method != "none":
            options = dict(options or {})
            if "text_exclude_ids" not in options and self._needs_text(method):
                options["text_exclude_ids"] = self.template_ids()
            mmc.apply(self.model, method, keep=keep, **options)

    @staticmethod
    def _needs_text(method: str) -> bool:
        import mmcompress as mmc

        try:
            return "text" in getattr(mmc.get(method), "needs", ())
        except (KeyError, ValueError):  # in-LLM methods read their text inside the LLM
            return False

    def template_ids(self) -> list[int]:
        """The tokenizer's special-token ids (chat-template markers such as ``<|user|>``/``<|assistant|>``): left out
        of the question that text-guided methods read. On a template that puts the question BEFORE the image
        (ref-vlm-mini), the tokens after the image are template markers only; without this the question span would
        be ``<|assistant|>`` alone (`mmcompress.hf.plumbing.question_mask` then falls back to every non-image,
        non-excluded token: the question)."""
        tok = getattr(self.processor, "tokenizer", self.processor)
        return sorted(int(i) for i in (getattr(tok, "all_special_ids", None) or ()))

    def _inputs(self, images: list[Any], prompts: list[str]) -> dict[str, Any]:
        proc = self.processor
        template = getattr(proc, "chat_template", None)
        if template and hasattr(proc, "apply_chat_template"):
            texts = [
                proc.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                    add_generation_prompt=True,
                )
                for p in prompts
            ]
        elif callable(getattr(proc, "prompt", None)):
            texts = prompts  # ref-vlm's processor applies its own template around the bare question
        else:
            marker = getattr(proc, "image_token", None)
            texts = [p if not marker or marker in p else f"{marker}\n{p}" for p in prompts]
        tok = getattr(proc, "tokenizer", None)
        if tok is not None and hasattr(tok, "padding_side"):
            tok.padding_side = "left"  # batched greedy decoding needs left padding
        inputs = proc(images=images, text=texts, return_tensors="pt", padding=True)
        return {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in dict(inputs).items()}

    def _decode(self, ids: Any) -> list[str]:
        dec = getattr(self.processor, "batch_decode", None) or self.processor.tokenizer.batch_decode
        return [t.strip() for t in dec(ids, skip_special_tokens=True)]

    def inputs_for(self, samples: Sequence[Sample], resize: bool = True) -> dict[str, Any]:
        """Model inputs of a batch; with the `resize` reference configured (and `resize`), the images downsampled."""
        if not samples:
            raise ValueError("samples: expected at least one sample")
        inputs = self._inputs([s.load_image() for s in samples], [s.prompt for s in samples])
        if resize and self.method == "resize":
            inputs = resize_inputs(inputs, self.keep, self.image_token_id, self._patch_size(), self._pad_id())
        return inputs

    def _patch_size(self) -> int:
        vc = getattr(self.model.config, "vision_config", None)
        p = getattr(vc, "patch_size", None)
        if not isinstance(p, int):
            raise ValueError("model: the resize reference needs vision_config.patch_size")
        return p

    def _pad_id(self) -> int:
        tok = getattr(self.processor, "tokenizer", None)
        pid = getattr(tok, "pad_token_id", None)
        if pid is None:
            pid = getattr(self.processor, "pad_token_id", None)
        return int(pid) if pid is not None else 0

    def media_tokens(self, sample: Sample) -> int:
        """Image tokens the uncompressed model hands its LLM for `sample` (placeholders after processing)."""
        ids = self._inputs([sample.load_image()], [sample.prompt])["input_ids"]
        return int(ids.eq(self.image_token_id).sum())

    def llm_layers(self) -> int:
        """Decoder layers of the LLM (0 when the config does not say)."""
        return self.shape.layers if self.shape is not None else 0

    def predict(self, samples: Sequence[Sample], max_new_tokens: int,
                gen: GenerationSettings | None = None) -> list[dict[str, Any]]:
        """Answers of one batch, with per-sample shares of the batch's measured times, the image tokens each LLM layer
        processed (`layer_tokens`), the text tokens and the exact prefill FLOPs (`mmcompress.evals.cost`).

        Args:
            samples: the batch.
            max_new_tokens: answer budget (``gen.max_new_tokens``, when set, wins).
            gen: decoding (`mmcompress.evals.generation`); None = greedy. Sampling is seeded from the batch's sample
                ids (`batch_seed`); with beams, each beam's row holds its sample's compressed image and the counts
                are the sample's. Answers are cut at ``gen.until``.
        """
        import torch

        import mmcompress as mmc
        from mmcompress.compressors.baselines import sample_keys

        gen = gen or GenerationSettings()
        inputs = self.inputs_for(samples)
        B, nb = len(samples), gen.num_beams
        dev = torch.device(self.device)
        rng = torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else [], enabled=gen.do_sample)
        # `random` draws per sample id: the same tokens in any batch, and in each beam's row of the sample
        memo = self.encoder_memo if self.encoder_memo is not None else contextlib.nullcontext()
        with rng, sample_keys([s.id for s in samples for _ in range(nb)]), memo:
            if gen.do_sample:
                torch.manual_seed(batch_seed([s.id for s in samples], gen))
            out, t = timed_generate(self.model, inputs, self.vision, self.device,
                                    max_new_tokens=gen.max_new_tokens or max_new_tokens, **gen.generate_kwargs())
        texts = [gen.cut(t) for t in self._decode(out[:, inputs["input_ids"].shape[1]:])]
        wrapped = self.method not in ("none", "resize")
        st = mmc.stats(self.model) if wrapped else {}
        if st and nb > 1:  # the stats count every beam's row (a sample's nb rows are consecutive): one per sample
            st = {k: v[::nb] if isinstance(v, list) and len(v) == B * nb else v for k, v in st.items()}
        tokens = llm_media_tokens(st, inputs["input_ids"], self.image_token_id, B)
        costs = self._costs(inputs, st, tokens)
        return [{"prediction": text, "tokens": n, **c, **per_sample(t, B, st)}
                for text, n, c in zip(texts, tokens, costs, strict=True)]

    def _costs(self, inputs: dict[str, Any], st: dict[str, Any], tokens: list[float]) -> list[dict[str, Any]]:
        """Per sample: text tokens, image tokens per LLM layer, prefill FLOPs (empty dicts without a shape)."""
        from mmcompress.evals.cost import prefill_flops

        if self.shape is None:
            return [{} for _ in tokens]
        ids = inputs["input_ids"]  # [B, L]
        am = inputs.get("attention_mask")
        live = ids.new_ones(ids.shape).bool() if am is None else am.bool()
        text = (live & ids.ne(self.image_token_id)).sum(1).tolist() if self.image_token_id is not None \
            else live.sum(1).tolist()
        per_layer = st.get("inllm_layer_tokens")
        if per_layer is None or len(per_layer) != len(tokens):
            per_layer = [[n] * self.shape.layers for n in tokens]
        out = []
        for t, media in zip(text, per_layer, strict=True):
            media = [int(round(m)) for m in media]
            out.append({"text_tokens": int(t), "layer_tokens": media,
                        "prefill_flops": prefill_flops(self.shape, [int(t) + m for m in media])})
        return out


def resize_inputs(inputs: dict[str, Any], keep: Any, image_token_id: int, patch: int, pad_id: int) -> dict[str, Any]:
    """The `resize` reference: each image downsampled (bilinear, antialiased, on the processed pixels) to the patch
    grid `mmcompress.evals.cost.resize_grid` picks for the budget, and its placeholder run cut to the new count.

    Args:
        inputs: processor outputs: ``pixel_values`` [B_img, 3, S_h, S_w], ``input_ids`` / ``attention_mask`` [B, L]
            (left-padded), one run of placeholders per image.
        keep: the budget (fraction of the image's tokens, or a token count).
        image_token_id: the placeholder id. patch: the encoder's patch side in pixels. pad_id: padding id.

    Returns:
        The inputs with ``pixel_values`` [B_img, 3, g_h * patch, g_w * patch] and the placeholder runs cut.

    Raises:
        ValueError: images that are not one placeholder run each, or pixels that are not a patch grid.
    """
    import torch
    import torch.nn.functional as F
    from mmcompress.evals.cost import budget_tokens, resize_grid

    pv = inputs.get("pixel_values")
    if not isinstance(pv, torch.Tensor) or pv.dim() != 4:
        raise ValueError("pixel_values: the resize reference needs one [B, 3, H, W] image tensor per batch")
    G = (pv.shape[-2] // patch, pv.shape[-1] // patch)
    ids, am = inputs["input_ids"], inputs.get("attention_mask")
    n_per = ids.eq(image_token_id).sum(1)  # [B] placeholders per sample
    if int(n_per.sum()) % pv.shape[0]:
        raise ValueError("input_ids: the resize reference needs the same placeholder count for every image")
    n = int(n_per.sum()) // pv.shape[0]
    extra = n - G[0] * G[1]  # tokens besides the patch grid (a CLS kept by the "full" strategy)
    if budget_tokens(keep, n) >= n:
        raise ValueError(f"keep: resize to {keep!r} keeps every one of the {n} image tokens; nothing to compare")
    gh, gw = resize_grid(budget_tokens(keep, n) - extra, G)
    small = F.interpolate(pv.float(), size=(gh * patch, gw * patch), mode="bilinear", antialias=True,
                          align_corners=False).to(pv.dtype)
    m = gh * gw + extra
    live = torch.ones_like(ids, dtype=torch.bool) if am is None else am.bool()
    rows = []
    for b in range(ids.shape[0]):
        row = ids[b][live[b]]
        img = row.eq(image_token_id).nonzero().squeeze(1).tolist()
        if len(img) % n:
            raise ValueError(f"input_ids: sample {b} has {len(img)} placeholders, not whole runs of {n}")
        drop = [p for r in range(0, len(img), n) for p in img[r + m: r + n]]
        mask = torch.ones(row.shape[0], dtype=torch.bool)
        mask[drop] = False
        rows.append(row[mask])
    L = max(r.shape[0] for r in rows)
    new_ids = torch.full((len(rows), L), pad_id, dtype=ids.dtype)
    new_am = torch.zeros((len(rows), L), dtype=am.dtype if am is not None else torch.long)
    for b, r in enumerate(rows):  # left padding, as generate() needs
        new_ids[b, L - r.shape[0]:] = r
        new_am[b, L - r.shape[0]:] = 1
    return {**inputs, "pixel_values": small, "input_ids": new_ids.to(ids.device),
            "attention_mask": new_am.to(ids.device)}
