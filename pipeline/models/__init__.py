"""Models: backbone registry, tiny backbones, the MLLM Embedder and the text Teacher."""
from __future__ import annotations

from pipeline.models.embedder import Embedder
from pipeline.models.inputs import InputBuilder, to_pil
from pipeline.models.loading import (
    META_FILE,
    RemoteCodeRequiredError,
    detect_family,
    load_backbone,
    read_backbone_meta,
    write_backbone_meta,
)
from pipeline.models.registry import (
    IMAGE_PLACEHOLDER,
    PROMPT_MODES,
    BackboneSpec,
    format_text,
    freeze_vision,
    get_backbone,
    known_families,
    lora_target_regex,
    resolve_path,
    unwrap_model,
    vision_parameters,
)
from pipeline.models.teacher import PACKAGED_MINILM, Teacher
from pipeline.models.tiny import build_tiny_model

__all__ = [
    "IMAGE_PLACEHOLDER",
    "META_FILE",
    "PACKAGED_MINILM",
    "PROMPT_MODES",
    "BackboneSpec",
    "Embedder",
    "InputBuilder",
    "RemoteCodeRequiredError",
    "Teacher",
    "build_tiny_model",
    "detect_family",
    "format_text",
    "freeze_vision",
    "get_backbone",
    "known_families",
    "load_backbone",
    "lora_target_regex",
    "read_backbone_meta",
    "resolve_path",
    "to_pil",
    "unwrap_model",
    "vision_parameters",
    "write_backbone_meta",
]
