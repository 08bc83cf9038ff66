"""UniME training pipeline: Ray Data + Ray Train + DeepSpeed."""
