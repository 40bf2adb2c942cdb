"""The training loop and what keeps it safe: one jitted step, its state, checkpoints, guards.

``loop`` runs a job (data → steps → periodic eval/checkpoint → export); ``objective`` is the
weighted sum of the method's tasks (the query–item loss is ``vlp_jax.losses.qic``); ``step`` is
the jitted train step around it; ``state`` builds the sharded train state; ``grad_cache``
accumulates contrastive gradients over micro-batches. The rest guard a long run:
``checkpointing`` (Orbax, atomic, falls back past unreadable steps), ``resume_config``,
``preemption``, ``nonfinite``, ``workdir_lock``, ``metrics_log``.

What it may import: docs/architecture.md ("Packages"), checked by tests/test_layout.py.
"""
