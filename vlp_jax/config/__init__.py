"""Config helpers: ``check`` validates a config before any work, naming the field that is wrong;
``overrides`` applies ``--set key=value`` overrides and loads config files.

What it may import: docs/architecture.md ("Packages"), checked by tests/test_layout.py.
"""
