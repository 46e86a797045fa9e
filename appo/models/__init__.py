"""Policies: loading local Qwen2/2.5-VL checkpoints and building the tiny default."""
