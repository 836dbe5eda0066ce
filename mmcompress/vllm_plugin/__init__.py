"""vLLM plugin entry point and settings: which compressor and budget a server (or a request) uses.

vLLM calls `register()` (entry point group `vllm.general_plugins`) in its engine and in every worker it spawns, so
it is idempotent and imports nothing heavy (no vLLM, no torch): the model classes in `models`, `llava` and `qwen3`
are registered by "module:Class" strings and imported only when vLLM loads one of the supported architectures.

Settings, the first one found wins:

1. per request: `mm_processor_kwargs={"mmcompress_method": "tome", "mmcompress_keep": 0.25}`;
2. per server: `--hf-overrides '{"mmcompress": {"method": "tome", "keep": 0.25}}'`;
3. per server: environment `MMCOMPRESS_METHOD=tome MMCOMPRESS_KEEP=0.25`.

A method that runs before the vision encoder (PixelPrune, `EncoderNeeds(stage="pixels")`) needs no keep (its count
comes from the pixels, which vLLM's processor has) and takes its compressor options (e.g. tau) as
`mmcompress_options` / `"options"` / `MMCOMPRESS_OPTIONS` (JSON); it is served on the Qwen families
(`mmcompress.vllm_plugin.pixels`).

No setting (or keep 1.0) leaves the model's features untouched. `MMCOMPRESS_VLLM=0` skips registration altogether
(plain vLLM). On an architecture not in `SUPPORTED`, an active setting is refused rather than ignored: a server
setting fails at engine start, a per-request one fails that request (the server keeps serving); both name the
architecture and list the supported ones.

Budgets are fixed before the encoder runs, because vLLM sizes each item's placeholder run in its processor: the count
is `budget(n, keep, method)`, a pure function of the item's token count. `keep="auto"` and other data-dependent
budgets are refused, as are the in-LLM methods (`mmcompress.hf.IN_LLM`: fastv, pdrop, sparsevlm, dart, trio; they
prune inside the LLM's layers). A pixel-stage method's count is a pure function of the item's pixels, so it is
fixed in the processor too. Every other method is served with what its `EncoderNeeds` declares (scores, keys,
CLS from vLLM's vision tower: `scores`; the request's question: `text`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["register", "Setting", "resolve", "budget", "method_needs", "pixel_stage", "SUPPORTED", "method_code",
           "method_name"]

#: vLLM architecture name -> "module:Class" of its compressing subclass.
SUPPORTED = {
    "Qwen2VLForConditionalGeneration": "mmcompress.vllm_plugin.models:MMCQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "mmcompress.vllm_plugin.models:MMCQwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "mmcompress.vllm_plugin.qwen3:MMCQwen3VLForConditionalGeneration",
    "LlavaForConditionalGeneration": "mmcompress.vllm_plugin.llava:MMCLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "mmcompress.vllm_plugin.llava:MMCLlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration":
        "mmcompress.vllm_plugin.llava:MMCLlavaOnevisionForConditionalGeneration",
}
REQUEST_KEYS = ("mmcompress_method", "mmcompress_keep", "mmcompress_options")
_registered = False


@dataclass(frozen=True)
class Setting:
    """A resolved compressor choice. `method` None means no compression. `pixels`: the method runs before the vision
    encoder (`EncoderNeeds(stage="pixels")`, PixelPrune): its count comes from the pixels, keep is not used (as in
    `mmc.apply`), and `options` (sorted (name, value) pairs, e.g. tau) are its compressor options."""

    method: str | None = None
    keep: int | float | str = 1.0
    options: tuple[tuple[str, Any], ...] = ()
    pixels: bool = False

    @property
    def active(self) -> bool:
        return self.method is not None and (self.pixels or self.keep != 1.0)


def supported_text() -> str:
    return ", ".join(sorted(SUPPORTED))


def register() -> None:
    """Register the compressing model classes with vLLM's `ModelRegistry` (idempotent; imports vLLM's registry
    module only)."""
    global _registered
    if _registered or os.environ.get("MMCOMPRESS_VLLM", "1").strip().lower() in ("0", "false", "off", "no"):
        return
    from vllm import ModelRegistry

    for arch, target in SUPPORTED.items():
        ModelRegistry.register_model(arch, target)
    _guard_unsupported()
    _registered = True


def refuse_unsupported(arch: str, setting: Setting, where: str) -> None:
    """Raise ValueError when `setting` is active on an architecture the plugin does not compress."""
    if setting.active:
        raise ValueError(f"{where}: mmcompress {setting.method!r} keep={setting.keep!r} was requested, but the "
                         f"mmcompress vLLM plugin does not support architecture {arch!r}, so its media tokens would "
                         f"be served uncompressed; supported architectures: {supported_text()}. Drop the setting "
                         "(or set MMCOMPRESS_VLLM=0) to serve this model uncompressed")


def _guard_unsupported() -> None:
    """Wrap `MULTIMODAL_REGISTRY.create_processor` (on the registry instance, once) so that a multimodal model of an
    unsupported architecture refuses active settings instead of silently serving uncompressed: the server setting is
    checked when vLLM builds the processor (engine start), a request's `mm_processor_kwargs` when it is processed."""
    import dataclasses

    from vllm.multimodal import MULTIMODAL_REGISTRY as reg

    orig = reg.create_processor
    if getattr(orig, "_mmcompress_guard", False):
        return

    def create_processor(model_config: Any, *args: Any, **kwargs: Any) -> Any:
        proc = orig(model_config, *args, **kwargs)
        arch = getattr(model_config, "architecture", None) or (model_config.architectures or ["?"])[0]
        if arch in SUPPORTED:
            return proc
        hf_config = model_config.hf_config
        refuse_unsupported(arch, resolve(hf_config), "server setting")
        apply = proc.apply

        def guarded_apply(inputs: Any, *a: Any, **k: Any) -> Any:
            req = dict(getattr(inputs, "hf_processor_mm_kwargs", None) or {})
            if any(key in req for key in REQUEST_KEYS):
                refuse_unsupported(arch, resolve(hf_config, req), "mm_processor_kwargs")
                inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs={
                    key: v for key, v in req.items() if key not in REQUEST_KEYS})
            return apply(inputs, *a, **k)

        proc.apply = guarded_apply
        return proc

    create_processor._mmcompress_guard = True
    reg.create_processor = create_processor


def _check_keep(keep: Any, where: str) -> int | float:
    if isinstance(keep, str):
        s = keep.strip()
        if s == "auto":
            raise ValueError(f"{where}: keep='auto' is a data-dependent budget; vLLM fixes each item's token count in "
                             "its processor before the encoder runs, so give an int (tokens per item) or a fraction "
                             "in (0, 1]")
        try:
            keep = int(s) if s.isdigit() else float(s)
        except ValueError:
            raise ValueError(f"{where}: keep must be an int >= 1 or a float in (0, 1], got {keep!r}") from None
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"{where}: keep must be an int >= 1 or a float in (0, 1], got {type(keep).__name__}")
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"{where}: an int keep is tokens per item and must be >= 1, got {keep}")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ValueError(f"{where}: a float keep is a fraction in (0, 1], got {keep}")
    return keep


def _check_method(method: Any, where: str) -> str | None:
    if method is None or (isinstance(method, str) and method.strip().lower() in ("", "none")):
        return None
    if not isinstance(method, str):
        raise TypeError(f"{where}: method must be a compressor name (str), got {type(method).__name__}")
    import mmcompress as mmc
    from mmcompress.catalog import IN_LLM

    if method in IN_LLM:
        raise ValueError(f"{where}: {method!r} prunes image tokens inside the LLM's layers (its attention decides "
                         "layer by layer); the mmcompress vLLM plugin compresses between the encoder and the LLM and "
                         "does not change vLLM's decoder, so it cannot serve it; usable with vLLM: "
                         f"{', '.join(mmc.available())}")
    try:
        comp_cls = mmc.get(method)
    except ValueError as e:  # names the close matches and what is available
        raise ValueError(f"{where}: {e}") from None
    if hasattr(comp_cls, "inllm_stage") and comp_cls().inllm_stage(None) is not None:
        raise ValueError(f"{where}: {method!r} also prunes inside the LLM's layers by default (its own in-LLM stage, "
                         "which mmc.apply runs); the mmcompress vLLM plugin does not change vLLM's decoder, so serving "
                         "only its part before the LLM would not be the method")
    needs = getattr(comp_cls, "encoder_needs", None)
    if needs is not None and isinstance(needs.layer, (tuple, list)):
        raise ValueError(f"{where}: {method!r} reads the attention of several vision blocks ({needs.layer}); the "
                         "mmcompress vLLM plugin serves scores of one block per method, so it cannot serve it; "
                         "mmc.apply runs it in transformers")
    return method


def resolve(hf_config: Any = None, request: dict[str, Any] | None = None) -> Setting:
    """The setting for one request: per-request kwargs, else `hf_config.mmcompress`, else the environment.

    Args:
        hf_config: the model's Hugging Face config (carries `mmcompress` when set by `--hf-overrides`).
        request: the request's `mm_processor_kwargs` (keys `mmcompress_method`, `mmcompress_keep`,
            `mmcompress_options`).
    """
    request = request or {}
    server = getattr(hf_config, "mmcompress", None) if hf_config is not None else None
    if server is not None and not isinstance(server, dict):
        raise TypeError(f"hf_overrides mmcompress: expected a dict with 'method' and 'keep', got {server!r}")
    if server:
        unknown = set(server) - {"method", "keep", "options"}
        if unknown:
            raise ValueError(f"hf_overrides mmcompress: unknown keys {sorted(unknown)}; expected 'method', 'keep' "
                             "and 'options'")
    env_m, env_k = os.environ.get("MMCOMPRESS_METHOD"), os.environ.get("MMCOMPRESS_KEEP")
    env_o = os.environ.get("MMCOMPRESS_OPTIONS")
    if any(k in request for k in REQUEST_KEYS):
        where = "mm_processor_kwargs"
        method = request.get("mmcompress_method", (server or {}).get("method", env_m))
        keep = request.get("mmcompress_keep", (server or {}).get("keep", env_k if env_k is not None else 1.0))
        options = request.get("mmcompress_options", (server or {}).get("options", env_o))
    elif server:
        where, method, keep = "hf_overrides mmcompress", server.get("method"), server.get("keep", 1.0)
        options = server.get("options")
    else:
        where, method, keep = "MMCOMPRESS_METHOD/MMCOMPRESS_KEEP", env_m, env_k if env_k is not None else 1.0
        options = env_o
    method = _check_method(method, where)
    pixels = pixel_stage(method)
    # a pixel-stage method's count comes from the pixels (keep unused, as in mmc.apply): "auto" is its own rule
    keep = "auto" if pixels and isinstance(keep, str) and keep.strip() == "auto" else _check_keep(keep, where)
    options = _check_options(options, method, where)
    if method is None and keep != 1.0:
        raise ValueError(f"{where}: keep={keep!r} given without a compressor method")
    return Setting(method, keep, options, pixels)


def pixel_stage(method: str | None) -> bool:
    """Whether `method` runs BEFORE the vision encoder (`EncoderNeeds(stage="pixels")`: PixelPrune)."""
    return method is not None and method_needs(method)[1].stage == "pixels"


def _check_options(options: Any, method: str | None, where: str) -> tuple[tuple[str, Any], ...]:
    """Compressor options (a dict, or its JSON text from the environment) as sorted (name, value) pairs; served for
    pixel-stage methods, whose whole selection runs in vLLM's processor (every other method's compressor is built
    in the model from (method, budget) alone)."""
    if options is None or options == {} or options == "":
        return ()
    if isinstance(options, str):
        import json

        try:
            options = json.loads(options)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: options must be a JSON object, e.g. '{{\"tau\": 0.02}}': {e}") from None
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ValueError(f"{where}: options must be a dict of compressor options, got {options!r}")
    if not pixel_stage(method):
        raise ValueError(f"{where}: options {sorted(options)} are served for the methods that run before the vision "
                         f"encoder (pixelprune) only; {method!r} runs with its defaults in the vLLM plugin")
    import mmcompress as mmc

    try:
        mmc.create(method, **options)  # the compressor's own checks (unknown names, bad values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: options {options!r} for {method!r}: {e}") from None
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))


def budget(n: int, keep: int | float, method: str | None = None, prefix: int = 0) -> int:
    """Tokens the compressor keeps of an item of `n` tokens (not counting `prefix` tokens passed ahead of them, e.g.
    LLaVA's CLS): the compressors' own rule (`Compressor._budget`: int keep, that many; float keep,
    round(keep * n), at least 1; a method with `prefix_in_budget` counts the prefix in keep). A pure function of
    (n, keep, method, prefix), so vLLM can size the placeholder run before the encoder runs; n means "all" (an int
    keep of n or more tokens is no compression here, where `mmc.apply` refuses it)."""
    if n < 1:
        return n
    if method is None:
        method, prefix = "uniform", 0
    comp = _budget_rule(method, keep)
    total = n + (prefix if comp.prefix_in_budget else 0)
    if isinstance(keep, int) and keep >= total:
        return n
    return min(n, comp._budget(n, prefix))  # the compressors' own rule, not a copy of it


@functools.lru_cache(maxsize=256, typed=True)
def _budget_rule(method: str, keep: int | float) -> Any:
    import mmcompress as mmc

    return mmc.create(method, keep=keep)


def method_needs(method: str) -> tuple[frozenset[str], Any]:
    """(what the compressor needs of "scores", "text", "grid", its `EncoderNeeds`) for the plugin's planning."""
    import mmcompress as mmc
    from mmcompress.compressors.base import EncoderNeeds

    cls = mmc.get(method)
    return frozenset(getattr(cls, "needs", ())), getattr(cls, "encoder_needs", None) or EncoderNeeds()


def method_code(method: str | None) -> int:
    """A compressor name as an int that travels with an item's tensors from vLLM's processor to its model (-1: none)."""
    if method is None:
        return -1
    import mmcompress as mmc

    return mmc.available().index(method)


def method_name(code: int) -> str | None:
    import mmcompress as mmc

    return None if code < 0 else mmc.available()[code]
