"""Tiny random-weight backbones of the real architecture classes, for tests and the demo.

``build_tiny_model`` writes a folder that ``load_backbone`` / ``Embedder.from_pretrained``
read like a real checkpoint: the real ``*ForConditionalGeneration`` class with a 2-layer,
64-wide config, a byte-level BPE tokenizer trained locally (no hub) with the family's
special tokens, the family's image processor set up for 32..64 px images, and
``unime_backbone.json``. A forward over 16 rows takes a fraction of a second on a CPU.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from pipeline.models.loading import write_backbone_meta
from pipeline.models.registry import get_backbone

logger = logging.getLogger(__name__)

HIDDEN_SIZE = 64
NUM_LAYERS = 2
NUM_HEADS = 4
TOKENIZER_VOCAB_SIZE = 1000
_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]  # LLaVA-NeXT any-res grid, pixels

_WORDS = (
    "red green blue yellow orange purple pink brown black white gray grey cyan magenta "
    "circle square triangle rectangle star ellipse oval line dot shape shapes "
    "left right top bottom center middle above below next to on in of the a an and with "
    "small large big tiny one two three four five six seven eight nine ten zero "
    "image picture photo sentence word text question answer caption query document "
    "Summary above sentence image in one word: Represent the given following "
    "Find me an everyday that matches Retrieve describe what is there how many which "
    "color colour background foreground is are not no yes"
)
_PROMPT_TEXTS = (
    "Summary above sentence in one word:",
    "Summary above image in one word:",
    "Summary above image and sentence in one word:",
    "Represent the given image with the following question:",
    "Find me an everyday image that matches the given caption:",
    "Represent the given image.",
)
_FAMILY_TOKENS = {
    "llava_next": {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>",
                   "extra": ("<image>", "[INST]", "[/INST]")},
    "qwen2_vl": {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "unk": None,
                 "extra": ("<|im_start|>", "<|vision_start|>", "<|vision_end|>",
                           "<|image_pad|>", "<|video_pad|>")},
}
_FAMILY_TOKENS["qwen2_5_vl"] = _FAMILY_TOKENS["qwen2_vl"]


def build_tiny_model(family: str, out_dir: str | Path, *, seed: int = 0,
                     vocab_texts: Iterable[str] | None = None) -> str:
    """Write a random-weight tiny backbone of ``family`` to ``out_dir``; return the path."""
    spec = get_backbone(family)
    if spec.requires_remote_code or family not in _BUILDERS:
        raise NotImplementedError(
            f"no tiny model for {family!r}: its model class ({family} = Phi-3.5-V) is not "
            "part of transformers, only the checkpoint's remote code, which cannot be "
            "instantiated offline without a real checkpoint folder; use llava_next, "
            "qwen2_vl or qwen2_5_vl for tests and the demo")
    if family == "qwen2_5_vl" and not hasattr(transformers, spec.model_class):
        raise NotImplementedError(f"transformers {transformers.__version__} has no "
                                  f"{spec.model_class}")
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(family, vocab_texts or ())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, image_processor = _BUILDERS[family](tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    write_backbone_meta(out, family=family, extra={"tiny": True, "seed": seed})
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("tiny %s backbone (%d parameters, vocab %d) written to %s in %.2fs",
                family, n_params, len(tokenizer), out, time.perf_counter() - start)
    return str(out)


def train_tokenizer(family: str, vocab_texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in milliseconds on built-in words + ``vocab_texts``."""
    names = _FAMILY_TOKENS[family]
    special = [t for t in (names["pad"], names["bos"], names["eos"], names["unk"]) if t]
    special += list(names["extra"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [_WORDS, *_PROMPT_TEXTS, *_WORDS.split(), *vocab_texts]
    tok.train_from_iterator(corpus, trainer=trainer)
    if names["bos"]:  # Mistral-style: <s> in front of every sequence
        bos = names["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=names["bos"], eos_token=names["eos"],
        pad_token=names["pad"], unk_token=names["unk"], padding_side="left")


def _build_llava_next(tokenizer: PreTrainedTokenizerFast) -> tuple[torch.nn.Module, object]:
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        MistralConfig,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, image_size=32, patch_size=16,
                              projection_dim=32)
    text = MistralConfig(**_text_kwargs(tokenizer), sliding_window=None)
    config = LlavaNextConfig(vision_config=vision, text_config=text,
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=_PINPOINTS)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=_PINPOINTS)
    return LlavaNextForConditionalGeneration(config).eval(), image_processor


def _build_qwen(tokenizer: PreTrainedTokenizerFast, family: str) -> tuple[torch.nn.Module, object]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    spec = get_backbone(family)
    head_dim = HIDDEN_SIZE // NUM_HEADS
    # M-RoPE splits head_dim/2 rotary frequencies over (temporal, height, width).
    mrope = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]
    text = dict(_text_kwargs(tokenizer), rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope})
    # Tiny-config constraint: the vision width must equal the text hidden size.
    vision = dict(depth=2, num_heads=NUM_HEADS, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, hidden_size=HIDDEN_SIZE)
    if family == "qwen2_vl":
        vision.update(embed_dim=HIDDEN_SIZE, mlp_ratio=2)
    else:
        vision.update(intermediate_size=2 * HIDDEN_SIZE, out_hidden_size=HIDDEN_SIZE,
                      window_size=32, fullatt_block_indexes=[1])
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"))}
    config_cls = getattr(transformers, spec.model_class.replace("ForConditionalGeneration",
                                                                "Config"))
    config = config_cls(text_config=text, vision_config=vision, **ids)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=8, temporal_patch_size=2, merge_size=2,
        min_pixels=16 * 16, max_pixels=64 * 64)
    return getattr(transformers, spec.model_class)(config).eval(), image_processor


def _text_kwargs(tokenizer: PreTrainedTokenizerFast) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=HIDDEN_SIZE,
                intermediate_size=2 * HIDDEN_SIZE, num_hidden_layers=NUM_LAYERS,
                num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_HEADS // 2,
                max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


_BUILDERS = {
    "llava_next": _build_llava_next,
    "qwen2_vl": lambda tok: _build_qwen(tok, "qwen2_vl"),
    "qwen2_5_vl": lambda tok: _build_qwen(tok, "qwen2_5_vl"),
}
