"""Training: the Ray Train worker loop shared by both stages (``loop``), the stages'
plug-ins (``stage1``, ``stage2``), DeepSpeed configs, the gradient cache (``grad_cache``),
checkpoint/resume and LoRA. The training steps themselves are ``pipeline.steps.stage1`` and
``pipeline.steps.stage2``.

Submodules import DeepSpeed lazily; importing this package stays cheap.
"""
