"""Config helpers: ``check`` validates a config before any work, naming the field that is wrong;
``overrides`` applies ``--set key=value`` overrides, loads config files (locked) and reads values
a config file defines (the bank recipe); ``saved`` completes configs written by older code.
Every field is defined in ``configs/base.py``.

What it may import: docs/architecture.md ("Packages"), checked by tests/test_layout.py.
"""
