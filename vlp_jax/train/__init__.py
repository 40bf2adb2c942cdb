"""The training loop and what keeps it safe: one jitted step, its state, checkpoints, guards.

``loop`` runs a job (data → steps → periodic eval/checkpoint → export); ``step`` is the jitted
train step that combines the method's losses (``vlp_jax.losses``) with its negatives
(``vlp_jax.parallel``); ``state`` builds the sharded train state; ``grad_cache`` accumulates
contrastive gradients over micro-batches.  The rest guard a long run: ``checkpointing`` (Orbax,
atomic, falls back past unreadable steps), ``resume_config``, ``preemption``, ``nonfinite``,
``workdir_lock``, ``metrics_log``.

May import: runtime, config, data, models, convert, losses, parallel, eval, indexing, serve.
"""
