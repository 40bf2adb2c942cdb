"""Config helpers: ``check`` validates a config before any work, naming the field that is wrong;
``overrides`` applies ``--set key=value`` overrides and loads config files.

May import: nothing else of vlp_jax (every other package may import this one).
"""
