"""Checkpoint conversion: HF safetensors <-> Megatron torch_dist, INT4 <-> BF16, cached stage."""
