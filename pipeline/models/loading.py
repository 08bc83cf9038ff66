"""Load a backbone folder (local or ``s3://``) into (model, input builder, spec); write the
folder's metadata (``unime_backbone.json``) and its sentence-transformers modules.

The family comes from ``unime_backbone.json`` (written by ``build_tiny_model`` and
``Embedder.save_pretrained``), else from config.json's ``model_type``. Weights load from
safetensors only; remote code runs only when the caller asks for it, and Phi-3.5-V has
no other way to load.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.models.registry import BackboneSpec, family_for_model_type, get_backbone

logger = logging.getLogger(__name__)

META_FILE = "unime_backbone.json"
META_FORMAT_VERSION = 1
_ST_MODULES = (("", "sentence_transformers.base.modules.transformer.Transformer"),
               ("1_Pooling", "sentence_transformers.sentence_transformer.modules.pooling.Pooling"),
               ("2_Normalize", "sentence_transformers.base.modules.normalize.Normalize"))


class RemoteCodeRequiredError(ValueError):
    """The family's model class exists only as the checkpoint's remote code."""


def write_backbone_meta(out_dir: str | Path, *, family: str, pooling: str = "last_token",
                        normalize: bool = True, prompt_mode: str = "one_word",
                        extra: dict[str, Any] | None = None) -> Path:
    """Write ``unime_backbone.json``: family, pooling, normalisation, prompt mode."""
    meta = {"format_version": META_FORMAT_VERSION, "family": family, "pooling": pooling,
            "normalize": normalize, "prompt_mode": prompt_mode, **(extra or {})}
    path = Path(out_dir) / META_FILE
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def sentence_transformers_prompts(prompt_mode: str) -> dict[str, str]:
    """Named prompts for ``SentenceTransformer.encode(prompt_name=...)``: the instructions the
    evaluate step puts in front of captions and image targets in instruction mode (none in the
    other modes, whose wrapping is all in the chat template)."""
    from pipeline.eval.sets import CAPTION_PREFIX, IMAGE_TEXT

    prompts = {"query": "", "document": ""}
    if prompt_mode == "instruction":
        prompts.update(caption_query=CAPTION_PREFIX[prompt_mode],
                       image_document=IMAGE_TEXT[prompt_mode])
    return prompts


def write_sentence_transformers_files(out_dir: str | Path, *, embedding_dim: int,
                                      prompt_mode: str) -> list[str]:
    """The sentence-transformers modules of an embedder folder: the Transformer module (the
    folder itself; every input goes through the processor's chat template, left-padded), last-
    token pooling, L2 normalisation, and the named prompts. Returns the files written."""
    out = Path(out_dir)
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    files = {
        "modules.json": [{"idx": i, "name": str(i), "path": path, "type": module}
                         for i, (path, module) in enumerate(_ST_MODULES)],
        "sentence_bert_config.json": {
            "transformer_task": "feature-extraction",
            "modality_config": {"text": forward, "image": forward, "image+text": forward,
                                "message": {**forward, "format": "structured"}},
            "module_output_name": "token_embeddings",
            # As the Embedder: left padding, no truncation (it could cut image tokens).
            "processing_kwargs": {"text": {"padding_side": "left", "truncation": False}}},
        "1_Pooling/config.json": {"embedding_dimension": embedding_dim,
                                  "pooling_mode": "lasttoken", "include_prompt": True},
        "2_Normalize/config.json": {"module_input_name": "sentence_embedding",
                                    "module_output_name": "sentence_embedding"},
        "config_sentence_transformers.json": {
            "model_type": "SentenceTransformer", "prompts": sentence_transformers_prompts(
                prompt_mode), "default_prompt_name": None, "similarity_fn_name": "cosine",
            "requirements": {"sentence_transformers": {
                "specifier": ">=6.2", "reason": "multimodal inputs through the processor's "
                "chat template (checked with 6.2.0)"}}},
    }
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    return list(files)


def read_backbone_meta(local_dir: str | Path) -> dict[str, Any]:
    """``unime_backbone.json`` of a folder, or ``{}`` for a plain HF checkpoint."""
    path = Path(local_dir) / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def resolve_local(path: str | Path) -> Path:
    """A local folder for ``path``; ``s3://`` prefixes are downloaded once per node."""
    if str(path).startswith("s3://"):
        from pipeline.download_cache import download_to_cache

        start = time.perf_counter()
        local = Path(download_to_cache(str(path)))
        logger.info("model %s available at %s (%.1fs)", path, local, time.perf_counter() - start)
        return local
    local = Path(path)
    if not local.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    return local


def detect_family(local_dir: str | Path) -> str:
    """Family from ``unime_backbone.json``, else from config.json ``model_type``."""
    family = read_backbone_meta(local_dir).get("family")
    if family:
        return str(family)
    config_path = Path(local_dir) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{local_dir} has neither {META_FILE} nor config.json")
    return family_for_model_type(json.loads(config_path.read_text()).get("model_type", ""))


def default_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``: bf16 on GPU, fp32 on CPU; strings like ``"bfloat16"`` are accepted."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} (e.g. float32, bfloat16, float16)")
    return resolved


def check_remote_code(spec: BackboneSpec, trust_remote_code: bool) -> None:
    if spec.requires_remote_code and not trust_remote_code:
        raise RemoteCodeRequiredError(
            f"family {spec.family!r} has no model class inside transformers and loads only "
            "with the checkpoint's own Python code; set model.trust_remote_code=true in the "
            "config (trust_remote_code=True) if you trust that checkpoint")


def load_backbone(path: str | Path, *, family: str | None = None,
                  trust_remote_code: bool = False, dtype: str | torch.dtype | None = None,
                  device: str | torch.device | None = None
                  ) -> tuple[torch.nn.Module, Any, BackboneSpec]:
    """(model in eval mode on ``device``, input builder, spec) for a backbone folder."""
    from pipeline.models.inputs import build_inputs

    start = time.perf_counter()
    local = resolve_local(path)
    spec = get_backbone(family or detect_family(local))
    check_remote_code(spec, trust_remote_code)
    target = default_device(device)
    torch_dtype = default_dtype(dtype, target)
    model = _load_model(spec, local, torch_dtype, trust_remote_code).to(target).eval()
    builder = build_inputs(spec, local, model.config, trust_remote_code=trust_remote_code)
    logger.info("loaded %s backbone from %s (%s, %s) in %.1fs", spec.family, path,
                torch_dtype, target, time.perf_counter() - start)
    return model, builder, spec


def _load_model(spec: BackboneSpec, local: Path, dtype: torch.dtype,
                trust_remote_code: bool) -> torch.nn.Module:
    import transformers

    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "local_files_only": True}
    if spec.requires_remote_code:
        return transformers.AutoModelForCausalLM.from_pretrained(
            local, trust_remote_code=trust_remote_code, **kwargs)
    model_cls = getattr(transformers, spec.model_class, None)
    if model_cls is None:
        raise RuntimeError(f"transformers {transformers.__version__} has no {spec.model_class} "
                           f"(needed for family {spec.family!r})")
    return model_cls.from_pretrained(local, **kwargs)
