"""Reinforcement learning: GRPO / DAPO / APPO losses, perception weights and trainers."""
