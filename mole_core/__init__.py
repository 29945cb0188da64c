"""MoLE Studio engine: Mixture of LoRA Experts on unmodified diffusers / transformers models."""
