"""Training: the Ray Train worker loop shared by both stages, DeepSpeed configs, the gradient
cache (``grad_cache``), checkpoint/resume and the stage entry functions.

Submodules import DeepSpeed lazily; importing this package stays cheap.
"""
