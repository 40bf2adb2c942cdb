"""Ahead-of-time compilation for TPU topologies on a machine without TPUs (``python -m
vlp_jax.aot``): the project's own train step, eval encoders and serving towers, compiled with
libtpu for compile-only devices, reported per device (docs/aot.md)."""
