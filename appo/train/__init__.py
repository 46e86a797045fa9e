"""Training loops: the SFT warm start (:mod:`appo.train.sft`) and the shared utilities
(:mod:`appo.train.common`) the RL trainer reuses."""
