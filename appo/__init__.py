"""APPO: attention-guided perception policy optimisation (and GRPO/DAPO) for video VLMs."""

__version__ = "0.1.0"
