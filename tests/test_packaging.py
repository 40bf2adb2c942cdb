"""Set-up files: pyproject.toml installs without setuptools' license deprecation warning, its
accelerator extras pull the GPU/TPU build of the jax the package pins (never another jax), and
the Makefile's Python one-liners run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_license_is_an_spdx_string_with_a_backend_that_reads_it():
    # A {text = ...} table makes setuptools >= 77 warn on every install (an error from 2027-02).
    data = _pyproject()
    assert data["project"]["license"] == "Apache-2.0"
    backend = [Requirement(r) for r in data["build-system"]["requires"]]
    setuptools = next(r for r in backend if r.name == "setuptools")
    # The SPDX form needs setuptools >= 77 (PEP 639): no older version may be allowed.
    assert not any(setuptools.specifier.contains(v) for v in ("68.0", "76.9"))
    assert setuptools.specifier.contains("77.0")


def test_accelerator_extras_pin_the_same_jax_range():
    data = _pyproject()
    core = {Requirement(r).name: Requirement(r) for r in data["project"]["dependencies"]}
    extras = data["project"]["optional-dependencies"]
    for extra, jax_extra in (("cuda12", "cuda12"), ("tpu", "tpu")):
        (req,) = [Requirement(r) for r in extras[extra]]
        assert req.name == "jax" and req.extras == {jax_extra}, extra
        assert req.specifier == core["jax"].specifier, extra
    # The range admits the jax in use here, so the extras resolve to its accelerator build.
    import jax

    assert core["jax"].specifier.contains(re.sub(r"\.dev.*", "", jax.__version__))


def test_makefile_python_snippets_run():
    # `make venv` probes for tcmalloc with `$(PY) -c "..."`; an import moved by a refactor made
    # the probe fail every time, so make ran apt-get even when the library was installed.
    with open(os.path.join(REPO, "Makefile")) as f:
        snippets = re.findall(r'\$\(PY\) -c "([^"]+)"', f.read())
    assert snippets
    for code in snippets:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, (code, proc.stderr)
