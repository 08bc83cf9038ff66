"""Per-family batch builders: formatted prompts + optional images -> model tensors.

Every builder takes prompts that already hold the family's image placeholder (see
``registry.format_text``) and one image or ``None`` per row, and returns one left-padded
batch in which text-only rows and image rows are mixed: the image tensors hold only the
rows that have an image, in row order, which is how every family's model pairs image
features with image tokens. Position ids count real tokens only, so a row's embedding does
not depend on the padding its batch needs.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from pipeline.models.registry import BackboneSpec

logger = logging.getLogger(__name__)

ImageInput = bytes | Image.Image | None
PROCESSOR_CONFIG_FILE = "processor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Packages AutoProcessor needs for a family beyond the pipeline's own (the pipeline itself
# builds Qwen inputs from the PIL image processor and the tokenizer).
_AUTO_PROCESSOR_NEEDS = {"qwen2_vl": "torchvision", "qwen2_5_vl": "torchvision"}


class InputBuilder(Protocol):
    """What ``Embedder`` needs from a family's processor."""

    tokenizer: Any
    image_processor: Any

    def __call__(self, prompts: list[str], images: list[Image.Image | None]
                 ) -> dict[str, torch.Tensor]: ...

    def save_pretrained(self, out_dir: str | Path, *, chat_template: str) -> None:
        """Tokenizer, image processor and the full processor config (``processor_config.json``
        with ``chat_template.jinja``), so that ``AutoProcessor.from_pretrained`` loads it."""


def to_pil(image: bytes | Image.Image) -> Image.Image:
    """Encoded bytes or a PIL image -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, bytes | bytearray | memoryview):
        from pipeline.data.images import decode_rgb

        return decode_rgb(bytes(image))
    raise TypeError(f"an image must be encoded bytes or a PIL image, got {type(image).__name__}")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each left-padded row; 0 on padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, L)


def _check_placeholders(spec: BackboneSpec, prompts: list[str],
                        images: list[Image.Image | None]) -> None:
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    for row, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        count = prompt.count(spec.image_token)
        if count != (image is not None):
            raise ValueError(f"row {row}: prompt has {count} {spec.image_token!r} token(s) but "
                             f"{'an image' if image is not None else 'no image'}")


class LlavaNextInputs:
    """LLaVA-NeXT: the stock processor, set up from the model config.

    ``num_additional_image_tokens=1`` counts CLIP's CLS token, which the processor must know
    about or the number of ``<image>`` tokens and of image features disagree.
    """

    def __init__(self, spec: BackboneSpec, tokenizer: Any, image_processor: Any,
                 model_config: Any) -> None:
        from transformers import LlavaNextProcessor

        self.spec, self.tokenizer, self.image_processor = spec, tokenizer, image_processor
        self.processor = LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer,
            patch_size=model_config.vision_config.patch_size,
            vision_feature_select_strategy=model_config.vision_feature_select_strategy,
            num_additional_image_tokens=1, image_token=spec.image_token)

    def __call__(self, prompts: list[str], images: list[Image.Image | None]
                 ) -> dict[str, torch.Tensor]:
        _check_placeholders(self.spec, prompts, images)
        present = [image for image in images if image is not None]
        batch = self.processor(text=prompts, images=present or None, padding="longest",
                               padding_side="left", return_tensors="pt")
        out = {key: batch[key] for key in ("input_ids", "attention_mask")}
        if present:
            out["pixel_values"] = batch["pixel_values"]  # (I, crops, 3, H, W)
            out["image_sizes"] = batch["image_sizes"]  # (I, 2)
        out["position_ids"] = position_ids_from_mask(out["attention_mask"])  # (B, L)
        return out

    def save_pretrained(self, out_dir: str | Path, *, chat_template: str) -> None:
        self.image_processor.save_pretrained(out_dir)  # preprocessor_config.json (transformers 4)
        self.processor.chat_template = chat_template
        self.processor.save_pretrained(out_dir)  # tokenizer, processor_config.json, chat template


class QwenVLInputs:
    """Qwen2-VL / Qwen2.5-VL without the stock processor (its video part needs torchvision).

    The image processor gives flattened patches and one (t, h, w) grid per image; each
    ``<|image_pad|>`` is expanded to ``t*h*w // merge_size**2`` tokens, and
    ``mm_token_type_ids`` (1 on image tokens) lets the model build M-RoPE positions.
    """

    def __init__(self, spec: BackboneSpec, tokenizer: Any, image_processor: Any,
                 model_config: Any) -> None:
        self.spec, self.tokenizer, self.image_processor = spec, tokenizer, image_processor
        self.image_token_id = model_config.image_token_id
        self.merge_size = model_config.vision_config.spatial_merge_size

    def __call__(self, prompts: list[str], images: list[Image.Image | None]
                 ) -> dict[str, torch.Tensor]:
        _check_placeholders(self.spec, prompts, images)
        present = [image for image in images if image is not None]
        vision: dict[str, torch.Tensor] = {}
        if present:
            processed = self.image_processor(images=present, return_tensors="pt")
            vision = {"pixel_values": processed["pixel_values"],  # (patches, C*T*P*P)
                      "image_grid_thw": processed["image_grid_thw"]}  # (I, 3)
            counts = (vision["image_grid_thw"].prod(-1) // self.merge_size**2).tolist()
            prompts = self._expand(prompts, images, counts)
        batch = self.tokenizer(prompts, padding="longest", padding_side="left",
                               return_tensors="pt")
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if present:
            out["mm_token_type_ids"] = (out["input_ids"] == self.image_token_id).long()  # (B, L)
            out.update(vision)
        else:  # with images the model derives M-RoPE positions from the mask itself
            out["position_ids"] = position_ids_from_mask(out["attention_mask"])  # (B, L)
        return out

    def _expand(self, prompts: list[str], images: list[Image.Image | None],
                counts: list[int]) -> list[str]:
        token, it = self.spec.image_token, iter(counts)
        return [p.replace(token, token * next(it)) if image is not None else p
                for p, image in zip(prompts, images, strict=True)]

    def save_pretrained(self, out_dir: str | Path, *, chat_template: str) -> None:
        """What ``Qwen2VLProcessor.save_pretrained`` writes, by hand: that class cannot be built
        without torchvision (its video processor), but the folder must load where it exists."""
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)
        image = self.image_processor.to_dict()
        video = {key: image[key] for key in ("patch_size", "temporal_patch_size", "merge_size",
                                             "image_mean", "image_std", "size") if key in image}
        config = {"processor_class": processor_class(self.spec), "image_processor": image,
                  "video_processor": {**video, "video_processor_type": "Qwen2VLVideoProcessor"}}
        write_processor_config(out_dir, config, chat_template)


class Phi3VInputs:
    """Phi-3.5-V through its remote-code processor, one row at a time, then collated.

    The remote processor handles one prompt per call; rows are left-padded here and the
    image tensors of image rows concatenated (crops padded with zeros to the batch maximum).
    Not exercised offline: no Phi-3.5-V checkpoint is available in tests.
    """

    def __init__(self, spec: BackboneSpec, processor: Any) -> None:
        self.spec, self.processor = spec, processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor

    def __call__(self, prompts: list[str], images: list[Image.Image | None]
                 ) -> dict[str, torch.Tensor]:
        _check_placeholders(self.spec, prompts, images)
        rows = [self.processor(prompt, [image] if image is not None else None,
                               return_tensors="pt")
                for prompt, image in zip(prompts, images, strict=True)]
        pad_id = self.tokenizer.pad_token_id or 0
        length = max(row["input_ids"].shape[1] for row in rows)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # (B, L)
        for i, row in enumerate(rows):
            n = row["input_ids"].shape[1]
            input_ids[i, length - n:] = row["input_ids"][0]
            attention_mask[i, length - n:] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask,
               "position_ids": position_ids_from_mask(attention_mask)}
        with_image = [row for row in rows if "pixel_values" in row]
        if with_image:
            crops = max(row["pixel_values"].shape[1] for row in with_image)
            out["pixel_values"] = torch.cat([_pad_dim1(row["pixel_values"], crops)
                                             for row in with_image])  # (I, crops, 3, H, W)
            out["image_sizes"] = torch.cat([row["image_sizes"] for row in with_image])  # (I, 2)
        return out

    def save_pretrained(self, out_dir: str | Path, *, chat_template: str) -> None:
        self.processor.chat_template = chat_template
        self.processor.save_pretrained(out_dir)


def _pad_dim1(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[1] == size:
        return x
    pad = x.new_zeros((x.shape[0], size - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


def processor_class(spec: BackboneSpec) -> str:
    """The family's transformers processor class name (``...Processor``)."""
    if spec.requires_remote_code:
        return "Phi3VProcessor"  # the checkpoint's remote code
    return spec.model_class.replace("ForConditionalGeneration", "Processor")


def write_processor_config(out_dir: str | Path, config: dict[str, Any], chat_template: str) -> None:
    """``processor_config.json`` and ``chat_template.jinja`` as ``ProcessorMixin`` saves them."""
    out = Path(out_dir)
    (out / PROCESSOR_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / CHAT_TEMPLATE_FILE).write_text(chat_template)


def auto_loader_blocker(spec: BackboneSpec) -> str | None:
    """Why ``AutoProcessor`` / ``AutoModel`` (sentence-transformers, plain transformers) cannot
    load this family's folder here, or None."""
    if spec.requires_remote_code:
        return (f"not supported for {spec.family}: its remote code registers no AutoModel class "
                "and its processor takes one prompt per call (use Embedder.from_pretrained)")
    package = _AUTO_PROCESSOR_NEEDS.get(spec.family)
    if package is None or importlib.util.find_spec(package) is not None:
        return None
    return (f"{processor_class(spec)} (what AutoProcessor and sentence-transformers load for "
            f"{spec.family}) needs {package} for its video processor, and {package} is not "
            "installed")


def build_inputs(spec: BackboneSpec, local_dir: str | Path, model_config: Any, *,
                 trust_remote_code: bool = False) -> InputBuilder:
    """The input builder of ``spec.family`` for the checkpoint folder ``local_dir``."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    if spec.family == "phi3_v":
        processor = AutoProcessor.from_pretrained(local_dir, trust_remote_code=trust_remote_code,
                                                  local_files_only=True)
        return Phi3VInputs(spec, processor)
    tokenizer = AutoTokenizer.from_pretrained(local_dir, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        logger.warning("tokenizer of %s has no pad token: using eos %r (padding is masked)",
                       local_dir, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    image_processor = AutoImageProcessor.from_pretrained(local_dir, local_files_only=True)
    builder_cls = LlavaNextInputs if spec.family == "llava_next" else QwenVLInputs
    return builder_cls(spec, tokenizer, image_processor, model_config)


def load_image(image: ImageInput) -> Image.Image | None:
    """``None`` stays ``None``; bytes are decoded once here."""
    return None if image is None else to_pil(image)

