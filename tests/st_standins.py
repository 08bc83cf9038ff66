"""Stand-ins that let sentence-transformers' ``mine_hard_negatives`` run on fixed vectors.

``datasets`` is not installed here; ``mine_hard_negatives`` only builds and indexes one
``Dataset``, so a minimal in-memory container stands in for it. The model returns
precomputed unit vectors looked up by text, so both miners see identical embeddings.
Used by tests/test_mining_core.py and bench/mining.py.
"""
from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import torch


class InMemoryDataset:
    """The part of ``datasets.Dataset`` that ``mine_hard_negatives`` touches."""

    def __init__(self, columns: dict[str, list]) -> None:
        self._columns = {name: list(values) for name, values in columns.items()}

    @classmethod
    def from_dict(cls, columns: dict[str, list]) -> InMemoryDataset:
        return cls(columns)

    @property
    def column_names(self) -> list[str]:
        return list(self._columns)

    def __len__(self) -> int:
        return len(next(iter(self._columns.values())))

    def __getitem__(self, column: str) -> list:
        return self._columns[column]

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self._columns)


class FixedEmbeddingModel:
    """``encode_query`` / ``encode_document`` return fixed unit vectors looked up by text."""

    device = torch.device("cpu")

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table

    def _encode(self, texts: list[str], **_: Any) -> np.ndarray:
        return np.stack([self.table[text] for text in texts])  # (n, d)

    encode_query = encode_document = _encode

    def get_embedding_dimension(self) -> int:
        return int(next(iter(self.table.values())).shape[0])

    def similarity(self, a: Any, b: Any) -> torch.Tensor:
        return torch.as_tensor(a) @ torch.as_tensor(b).T  # (n, m)

    def similarity_pairwise(self, a: Any, b: Any) -> torch.Tensor:
        return (torch.as_tensor(a) * torch.as_tensor(b)).sum(-1)  # (n,)


def datasets_standin() -> types.ModuleType:
    """A ``datasets`` module holding only ``Dataset`` = InMemoryDataset."""
    module = types.ModuleType("datasets")
    module.Dataset = InMemoryDataset  # type: ignore[attr-defined]
    return module


def enable_mine_hard_negatives() -> Any:
    """Install the stand-in ``datasets`` for good (bench scripts); returns the module
    ``sentence_transformers.util.hard_negatives``. Tests use monkeypatch instead."""
    from sentence_transformers.util import hard_negatives

    sys.modules.setdefault("datasets", datasets_standin())
    hard_negatives.is_datasets_available = lambda: True
    return hard_negatives
