"""vlp_jax.runtime.allocator: finding a caching malloc and re-executing under it exactly once."""

import os
import subprocess
import sys
import textwrap

import pytest

from vlp_jax.runtime import allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_lib(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    return str(path)


def test_auto_prefers_tcmalloc_and_sets_its_no_release_environment(tmp_path):
    _fake_lib(tmp_path, "libjemalloc.so.2")
    tc = _fake_lib(tmp_path, "libtcmalloc_minimal.so.4")
    path, extra = allocator.find_allocator("auto", lib_dirs=[str(tmp_path)])
    assert path == tc
    assert extra["TCMALLOC_RELEASE_RATE"] == "0"


def test_falls_back_to_jemalloc_then_to_nothing(tmp_path):
    je = _fake_lib(tmp_path, "libjemalloc.so.2")
    path, extra = allocator.find_allocator("auto", lib_dirs=[str(tmp_path)])
    assert path == je and extra == {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
    assert allocator.find_allocator("auto", lib_dirs=[str(tmp_path / "empty")]) is None
    assert allocator.find_allocator("system", lib_dirs=[str(tmp_path)]) is None


def test_explicit_path_must_exist(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        allocator.find_allocator(str(tmp_path / "libnope.so"))


def test_preload_environment_keeps_user_values_and_other_preloads():
    env = {"LD_PRELOAD": "/x/libother.so", "TCMALLOC_RELEASE_RATE": "5"}
    out = allocator.preload_environment(env, "/x/libtc.so", {"TCMALLOC_RELEASE_RATE": "0"})
    assert out["LD_PRELOAD"] == "/x/libtc.so:/x/libother.so"
    assert out["TCMALLOC_RELEASE_RATE"] == "5"  # the user's setting wins
    assert env == {"LD_PRELOAD": "/x/libother.so", "TCMALLOC_RELEASE_RATE": "5"}  # not mutated


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux-only")
def test_reexec_runs_the_command_again_once_with_the_library_preloaded(tmp_path):
    # A real, harmless shared library stands in for tcmalloc: libm is on every Linux system.
    candidates = ("/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6",
                  "/lib64/libm.so.6", "/usr/lib64/libm.so.6", "/lib/aarch64-linux-gnu/libm.so.6")
    libm = next(p for p in candidates if os.path.isfile(p))
    log = tmp_path / "runs.txt"
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {REPO!r})
        with open({str(log)!r}, "a") as f:
            f.write(os.environ.get("LD_PRELOAD", "-") + " " + " ".join(sys.argv[1:]) + "\\n")
        from vlp_jax.runtime import allocator
        allocator.reexec_with_fast_allocator()
        print("active:", allocator.active_allocator())
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLP_ALLOCATOR", "LD_PRELOAD"))}
    env["VLP_ALLOCATOR"] = libm
    out = subprocess.run([sys.executable, str(script), "--flag=1"], env=env, capture_output=True,
                         text=True, check=True).stdout
    runs = log.read_text().splitlines()
    assert runs == ["- --flag=1", f"{libm} --flag=1"]  # first plain, then once preloaded
    assert out.strip() == f"active: {libm}"

    env["VLP_ALLOCATOR"] = "system"
    log.unlink()
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert log.read_text().splitlines() == ["- "] and out.strip() == "active: system"
