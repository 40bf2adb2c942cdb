"""The launch scripts run vlp_jax with the interpreter the user has (launch/find_python.sh).

A fixed ``.venv/bin/python`` failed with exit 127 for anyone who installed the package into
their own environment.  Stand-in interpreters log the command lines they get instead of
training, so these tests check which interpreter each script picks, in milliseconds.
"""

from __future__ import annotations

import os
import stat
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_PATH = "/usr/bin:/bin"  # coreutils only; every python3/python the tests see is fake


def _fake_python(path, log, *, has_vlp_jax: bool = True) -> str:
    """A stand-in interpreter: answers the scripts' probes, logs any other command line."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"""#!/bin/sh
case "$2" in
  *find_spec*) exit {0 if has_vlp_jax else 1};;
  *__version__*) echo 0.10.2; exit 0;;
esac
echo "{os.path.basename(os.path.dirname(path))} $*" >> "{log}"
""")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return str(path)


def _run(script, args, *, cwd, path, log, **env):
    full_env = {"PATH": path, "HOME": str(cwd), **env}
    proc = subprocess.run(["/bin/bash", os.path.join(REPO, "launch", script), *args], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=60)
    lines = open(log).read().splitlines() if os.path.exists(log) else []
    return proc, sorted(lines)


def _local(tmp_path, bins, **env):
    log = str(tmp_path / "calls.log")
    path = ":".join([*(str(tmp_path / b) for b in bins), SYSTEM_PATH])
    return _run("local_multiprocess.sh", ["2", "--config=configs/tiny.py"], cwd=tmp_path,
                path=path, log=log, PORT="23456", **env)


def _launched(name: str) -> list[str]:
    # Process 1 runs under the supervisor that reports a lost process 0 (runtime/supervise.py).
    return [f"{name} -m {entry} --coordinator_address=127.0.0.1:23456 --num_processes=2 "
            f"--process_id={i} --config=configs/tiny.py"
            for i, entry in ((0, "vlp_jax.main"), (1, "vlp_jax.runtime.supervise"))]


def test_local_launcher_uses_the_active_interpreter(tmp_path):
    # No .venv in the working directory: the old default exited 127 here.
    _fake_python(tmp_path / "active" / "python3", tmp_path / "calls.log")
    proc, calls = _local(tmp_path, ["active"])
    assert proc.returncode == 0, proc.stderr
    assert calls == _launched("active")


def test_python_overrides_and_venv_is_the_fallback(tmp_path):
    log = tmp_path / "calls.log"
    _fake_python(tmp_path / "active" / "python3", log)
    custom = _fake_python(tmp_path / "custom" / "python", log)
    proc, calls = _local(tmp_path, ["active"], PYTHON=custom)
    assert proc.returncode == 0 and calls == _launched("custom"), proc.stderr
    os.remove(log)
    # python3 and python on PATH lack vlp_jax (e.g. the system one): ./.venv/bin/python runs.
    _fake_python(tmp_path / "plain" / "python3", log, has_vlp_jax=False)
    _fake_python(tmp_path / "plain" / "python", log, has_vlp_jax=False)
    _fake_python(tmp_path / ".venv" / "bin" / "python", log)
    proc, calls = _local(tmp_path, ["plain"])
    assert proc.returncode == 0 and calls == _launched("bin"), proc.stderr


def test_no_usable_interpreter_names_the_fixes(tmp_path):
    _fake_python(tmp_path / "plain" / "python3", tmp_path / "calls.log", has_vlp_jax=False)
    _fake_python(tmp_path / "plain" / "python", tmp_path / "calls.log", has_vlp_jax=False)
    proc, calls = _local(tmp_path, ["plain"])
    assert proc.returncode == 127 and calls == []
    assert "no Python with vlp_jax found" in proc.stderr and "PYTHON=" in proc.stderr


def test_cluster_scripts_use_the_active_interpreter(tmp_path):
    log = str(tmp_path / "calls.log")
    _fake_python(tmp_path / "active" / "python3", log)
    fakes = tmp_path / "tools"
    fakes.mkdir()
    # srun runs its command here; gcloud runs --command="..." through a shell, as on a worker.
    (fakes / "srun").write_text('#!/bin/sh\nshift\nexec "$@"\n')
    (fakes / "gcloud").write_text(
        '#!/bin/bash\nfor a in "$@"; do case "$a" in --command=*) exec bash -c "${a#--command=}"'
        ';; esac; done\n')
    for tool in ("srun", "gcloud"):
        os.chmod(fakes / tool, 0o755)
    path = f"{tmp_path / 'active'}:{fakes}:{SYSTEM_PATH}"
    proc, calls = _run("slurm_gpu.sbatch", ["--config=configs/base.py"], cwd=tmp_path, path=path,
                       log=log, REPO_DIR=REPO)
    assert proc.returncode == 0 and calls == ["active -m vlp_jax.main --config=configs/base.py"]
    os.remove(log)
    proc, calls = _run("slurm_gpu.sbatch", ["--config=configs/base.py"], cwd=tmp_path, path=path,
                       log=log, REPO_DIR=REPO, SLURM_NTASKS="2")  # several tasks: supervised
    assert proc.returncode == 0, proc.stderr
    assert calls == ["active -m vlp_jax.runtime.supervise --config=configs/base.py"]
    os.remove(log)
    proc, calls = _run("tpu_pod.sh", ["--config=configs/base.py", "--workdir=gs://b/run a"],
                       cwd=tmp_path, path=path, log=log, REPO_DIR=REPO, TPU_NAME="t", ZONE="z")
    assert proc.returncode == 0, proc.stderr
    assert calls == ["active -m pip install -q jax[tpu]==0.10.2",  # the installed jax's TPU build
                     "active -m vlp_jax.runtime.supervise --config=configs/base.py "
                     "--workdir=gs://b/run a"]
