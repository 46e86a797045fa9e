"""The generation engine: how any stage samples responses and reads attention.

- :mod:`appo.engine.decoding`: KV-cached sampling, each prompt prefilled once per group (static
  compiled or dynamic cache);
- :mod:`appo.engine.rollout`: :class:`~appo.engine.rollout.Rollout`, G responses per prompt with
  their sampling log-probs, and :func:`~appo.engine.rollout.token_logprobs` for scoring;
- :mod:`appo.engine.frame_attention`: the exact attention of each response token to each
  temporal patch of the video, without eager attention.

RL (:mod:`appo.rl`) and evaluation (:mod:`appo.eval`) both generate through it; it knows no
algorithm.
"""
