"""Backbone registry: what differs between the MLLM families.

One frozen ``BackboneSpec`` per family says which Hugging Face class to load, how the
family writes an image into a prompt, the E5-V style one-word prompts and the stage-2
instruction wrapper in the family's chat format, where the language model and the
vision tower + projector live inside the loaded model, and which linear layers LoRA
targets. Everything that formats text or resolves submodules goes through this file, so
adding a family is one new entry.

Texts arrive in the canonical convention of the data layer: MMEB's ``<|image_1|>`` marks
where the (single) image of a row goes.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from pipeline.data.conventions import IMAGE_PLACEHOLDER  # where an image goes in a text (MMEB's)

logger = logging.getLogger(__name__)

PromptMode = Literal["one_word", "instruction", "raw"]
PROMPT_MODES: tuple[str, ...] = ("one_word", "instruction", "raw")

_LM_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_CLIP_LORA = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True)
class BackboneSpec:
    """Everything family-specific about one MLLM backbone.

    Templates use ``{text}`` for the user text (inserted with ``str.replace``, so braces in
    the text are safe) and ``{image}`` for the family's image placeholder.
    """

    family: str
    model_class: str                 # class inside transformers ('' = remote code only)
    model_types: tuple[str, ...]     # config.json model_type values of this family
    image_placeholder: str           # what replaces IMAGE_PLACEHOLDER in a prompt
    image_token: str                 # the token the processor repeats per image feature
    chat_template: str               # one user turn, open assistant turn: wraps {text}
    text_prompt: str                 # one-word prompt for a sentence
    image_prompt: str                # one-word prompt for an image alone
    image_text_prompt: str           # one-word prompt for an image with text
    language_model_path: str         # stage 1 trains only this (LoRA)
    vision_paths: tuple[str, ...]    # vision tower + projector (frozen in stage 1)
    lora_target_modules: tuple[str, ...]         # linear layers of the language model
    vision_lora_target_modules: tuple[str, ...]  # linear layers under vision_paths
    core_path: str = "model"         # base model returning last_hidden_state (no lm_head)
    requires_remote_code: bool = False

    def wrap(self, text: str) -> str:
        """``text`` inside one user turn of the family's chat format."""
        return self.chat_template.replace("{text}", text)


def _one_word(chat: str) -> dict[str, str]:
    return {
        "text_prompt": chat.replace("{text}", "{text}\nSummary above sentence in one word:"),
        "image_prompt": chat.replace("{text}", "{image}\nSummary above image in one word:"),
        "image_text_prompt": chat.replace(
            "{text}", "{image}\n{text}\nSummary above image and sentence in one word:"),
    }


_MISTRAL_CHAT = "[INST] {text} [/INST]"
_PHI3_CHAT = "<|user|>\n{text}<|end|>\n<|assistant|>\n"
_QWEN_CHAT = "<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

_QWEN_COMMON = dict(
    image_placeholder=_QWEN_IMAGE,
    image_token="<|image_pad|>",
    chat_template=_QWEN_CHAT,
    **_one_word(_QWEN_CHAT),
    language_model_path="model.language_model",
    vision_paths=("model.visual",),
    lora_target_modules=_LM_LORA,
)

_SPECS: dict[str, BackboneSpec] = {
    "llava_next": BackboneSpec(
        family="llava_next",
        model_class="LlavaNextForConditionalGeneration",
        model_types=("llava_next",),
        image_placeholder="<image>",
        image_token="<image>",
        chat_template=_MISTRAL_CHAT,
        **_one_word(_MISTRAL_CHAT),
        language_model_path="model.language_model",
        vision_paths=("model.vision_tower", "model.multi_modal_projector", "model.image_newline"),
        lora_target_modules=_LM_LORA,
        vision_lora_target_modules=(*_CLIP_LORA, "linear_1", "linear_2"),
    ),
    "qwen2_vl": BackboneSpec(
        family="qwen2_vl",
        model_class="Qwen2VLForConditionalGeneration",
        model_types=("qwen2_vl",),
        vision_lora_target_modules=("qkv", "proj", "fc1", "fc2"),
        **_QWEN_COMMON,
    ),
    "qwen2_5_vl": BackboneSpec(
        family="qwen2_5_vl",
        model_class="Qwen2_5_VLForConditionalGeneration",
        model_types=("qwen2_5_vl",),
        vision_lora_target_modules=("qkv", "proj", "gate_proj", "up_proj", "down_proj"),
        **_QWEN_COMMON,
    ),
    "phi3_v": BackboneSpec(
        family="phi3_v",
        model_class="",  # Phi3VForCausalLM lives in the checkpoint's remote code
        model_types=("phi3_v",),
        image_placeholder=IMAGE_PLACEHOLDER,
        image_token=IMAGE_PLACEHOLDER,
        chat_template=_PHI3_CHAT,
        **_one_word(_PHI3_CHAT),
        # Phi3VModel holds the decoder layers itself, next to its image embedder.
        language_model_path="model",
        vision_paths=("model.vision_embed_tokens",),
        lora_target_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        vision_lora_target_modules=_CLIP_LORA,
        requires_remote_code=True,
    ),
}


def known_families() -> tuple[str, ...]:
    return tuple(_SPECS)


def get_backbone(family: str) -> BackboneSpec:
    """The spec of ``family``; a clear error lists the known ones."""
    try:
        return _SPECS[family]
    except KeyError:
        raise ValueError(f"unknown backbone family {family!r}; known families: "
                         f"{', '.join(_SPECS)}") from None


def family_for_model_type(model_type: str) -> str:
    """Family whose checkpoints have config.json ``model_type`` = ``model_type``."""
    for spec in _SPECS.values():
        if model_type in spec.model_types:
            return spec.family
    raise ValueError(f"no backbone family for model_type {model_type!r}; known families: "
                     f"{', '.join(_SPECS)} (pass family=... explicitly)")


# ---------------------------------------------------------------------------------------
# Prompts


def format_text(spec: BackboneSpec, text: str, *, has_image: bool,
                mode: PromptMode = "one_word") -> str:
    """Final prompt for one row, with the family's image placeholder.

    ``one_word``: E5-V prompt (sentence, image, or image + sentence); ``instruction``: the
    (VLM2Vec-style) instruction text wrapped in one chat turn; ``raw``: only the placeholder
    is replaced. A row with an image but no placeholder gets one in front (as the data layer
    does); a placeholder without an image, or more than one, is an error.
    """
    if mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompt mode {mode!r}; expected one of {PROMPT_MODES}")
    count = text.count(IMAGE_PLACEHOLDER)
    if count > 1 or (count and not has_image):
        raise ValueError(f"text has {count} {IMAGE_PLACEHOLDER} placeholder(s) but "
                         f"has_image={has_image} (at most one image per row): {text[:80]!r}")
    if has_image and not count:
        text = f"{IMAGE_PLACEHOLDER}\n{text}" if text.strip() else IMAGE_PLACEHOLDER
    if mode == "one_word":
        return _one_word_prompt(spec, text, has_image=has_image)
    body = text.replace(IMAGE_PLACEHOLDER, spec.image_placeholder)
    return body if mode == "raw" else spec.wrap(body)


def _one_word_prompt(spec: BackboneSpec, text: str, *, has_image: bool) -> str:
    if not has_image:
        return spec.text_prompt.replace("{text}", text)
    rest = text.replace(IMAGE_PLACEHOLDER, "").strip()
    template = spec.image_text_prompt if rest else spec.image_prompt
    return template.replace("{text}", rest).replace("{image}", spec.image_placeholder)


# Jinja twin of format_text, saved as the exported processor's chat template: a conversation
# (an optional system message = sentence-transformers prompt, then the user message) is one
# row; its text parts joined in order are the row's text, an image part is its image.
_CHAT_TEMPLATE = """{#- UniME embedding prompt of the %(family)s family: renders one row exactly as
pipeline.models.registry.format_text(spec, text, has_image=..., mode=prompt_mode) does. Text
parts of all messages are joined in order (a system message, i.e. a sentence-transformers
prompt, comes first); an image part is the row's image; MMEB's <|image_1|> in the text marks
where the image goes (in front when absent). prompt_mode: one_word | instruction | raw,
default %(mode)s (this folder's). Generated by pipeline.models.registry.chat_template. -#}
{%%- set mode = prompt_mode if prompt_mode is defined else %(mode_json)s -%%}
{%%- set marker = %(marker)s -%%}
{%%- set ns = namespace(text="", images=0) -%%}
{%%- for message in messages -%%}
  {%%- if message["content"] is string -%%}
    {%%- set ns.text = ns.text ~ message["content"] -%%}
  {%%- else -%%}
    {%%- for part in message["content"] -%%}
      {%%- if part["type"] == "text" -%%}
        {%%- set ns.text = ns.text ~ part["text"] -%%}
      {%%- elif part["type"] == "image" -%%}
        {%%- set ns.images = ns.images + 1 -%%}
      {%%- else -%%}
        {{- raise_exception("a row holds text and at most one image, not " ~ part["type"]) -}}
      {%%- endif -%%}
    {%%- endfor -%%}
  {%%- endif -%%}
{%%- endfor -%%}
{%%- set text = ns.text -%%}
{%%- set marks = text.count(marker) -%%}
{%%- if ns.images > 1 or marks > 1 or (marks and not ns.images) -%%}
  {{- raise_exception("a row holds at most one image and one " ~ marker ~ " marker, "
                      ~ "and the marker only with an image") -}}
{%%- endif -%%}
{%%- if ns.images and not marks -%%}
  {%%- set text = (marker ~ "\n" ~ text) if text | trim else marker -%%}
{%%- endif -%%}
{%%- if mode == "one_word" and not ns.images -%%}
  {%%- set prompt = %(text_prompt)s | replace("{text}", text) -%%}
{%%- elif mode == "one_word" -%%}
  {%%- set rest = text | replace(marker, "") | trim -%%}
  {%%- set template = %(image_text_prompt)s if rest else %(image_prompt)s -%%}
  {%%- set prompt = template | replace("{text}", rest) | replace("{image}", %(placeholder)s) -%%}
{%%- elif mode == "instruction" -%%}
  {%%- set prompt = %(chat)s | replace("{text}", text | replace(marker, %(placeholder)s)) -%%}
{%%- elif mode == "raw" -%%}
  {%%- set prompt = text | replace(marker, %(placeholder)s) -%%}
{%%- else -%%}
  {{- raise_exception("unknown prompt_mode " ~ mode ~ ": one_word, instruction or raw") -}}
{%%- endif -%%}
{{- prompt -}}
"""


def chat_template(spec: BackboneSpec, default_mode: PromptMode = "one_word") -> str:
    """The family's embedding prompt as a Jinja chat template (what ``format_text`` does).

    Saved as the processor's chat template, so ``AutoProcessor.apply_chat_template`` and
    sentence-transformers build the same prompts as the pipeline. ``prompt_mode`` (a template
    variable) picks the mode; it defaults to ``default_mode``.
    """
    if default_mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompt mode {default_mode!r}; expected one of {PROMPT_MODES}")
    literals = {name: json.dumps(value) for name, value in (
        ("mode_json", default_mode), ("marker", IMAGE_PLACEHOLDER),
        ("placeholder", spec.image_placeholder), ("chat", spec.chat_template),
        ("text_prompt", spec.text_prompt), ("image_prompt", spec.image_prompt),
        ("image_text_prompt", spec.image_text_prompt))}
    return _CHAT_TEMPLATE % {"family": spec.family, "mode": default_mode, **literals}


# ---------------------------------------------------------------------------------------
# Submodules and LoRA targets


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def resolve_path(model: nn.Module, path: str) -> nn.Module | nn.Parameter:
    """The submodule or parameter at dotted ``path`` of the (unwrapped) model."""
    obj: object = unwrap_model(model)
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{type(obj).__name__} has no attribute {part!r} "
                                 f"(resolving {path!r})")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module | nn.Parameter):
        raise TypeError(f"{path!r} is a {type(obj).__name__}, not a module or parameter")
    return obj


def vision_parameters(model: nn.Module, spec: BackboneSpec) -> list[nn.Parameter]:
    """Parameters of the vision tower and projector."""
    params: list[nn.Parameter] = []
    for path in spec.vision_paths:
        obj = resolve_path(model, path)
        params.extend(obj.parameters() if isinstance(obj, nn.Module) else [obj])
    return params


def freeze_vision(model: nn.Module, spec: BackboneSpec) -> int:
    """Stage 1: vision tower + projector in eval mode, ``requires_grad=False``.

    Returns the number of parameter elements frozen.
    """
    for path in spec.vision_paths:
        obj = resolve_path(model, path)
        if isinstance(obj, nn.Module):
            obj.eval()
    params = vision_parameters(model, spec)
    for param in params:
        param.requires_grad_(False)
    frozen = sum(p.numel() for p in params)
    logger.info("froze vision tower + projector of %s: %d parameters", spec.family, frozen)
    return frozen


def lora_target_regex(spec: BackboneSpec, *, include_vision: bool = False) -> str:
    """PEFT ``target_modules`` regex (full-match on module names of the HF model).

    Stage 1 (``include_vision=False``) targets only the language model's linear layers:
    names like ``q_proj`` also exist in CLIP / Qwen2.5-VL vision towers, so the match is
    anchored at ``language_model_path`` and excludes ``vision_paths``. Stage 2 can add the
    vision tower and projector. Apply it to the Hugging Face model (``Embedder.model``).
    """
    exclude = "".join(f"(?!{re.escape(p)}\\.)" for p in spec.vision_paths)
    lm_names = "|".join(map(re.escape, spec.lora_target_modules))
    parts = [f"{exclude}{re.escape(spec.language_model_path)}\\..*\\.({lm_names})"]
    if include_vision:
        vision_names = "|".join(map(re.escape, spec.vision_lora_target_modules))
        for path in spec.vision_paths:
            parts.append(f"{re.escape(path)}\\..*\\.({vision_names})")
    return "|".join(f"(?:{part})" for part in parts)
