"""Text conventions shared by the data layer and the models (no third-party imports, so an
exported model's loader needs none of the pipeline's data stack).

- ``IMAGE_PLACEHOLDER`` (MMEB's ``<|image_1|>``) marks where a row's single image goes in its
  text; each backbone family swaps in its own image tokens at encode time.
"""
from __future__ import annotations

IMAGE_PLACEHOLDER = "<|image_1|>"
