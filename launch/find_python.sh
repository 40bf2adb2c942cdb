# Sourced by the launch scripts (not run): sets PY, the interpreter that runs vlp_jax.
#
# Order: $PYTHON if set (used as given); else the active interpreter (python3, then python, on
# PATH) if it can import vlp_jax and jax (a user who installed the package into their own
# environment); else the repo's .venv/bin/python (what `make venv` creates), made first when
# VLP_MAKE_VENV=1.  A fixed .venv/bin/python default failed with "No such file or directory"
# (exit 127) for everyone who installed vlp_jax elsewhere.
#
# Run from the repository root (the .venv fallback and `make venv` are relative to it).

_vlp_can_run() {
  # find_spec, not import: no JAX start-up cost; jax too, since the repo's vlp_jax/ is
  # importable from its root by any interpreter.
  "$1" -c 'import importlib.util as u, sys
sys.exit(0 if u.find_spec("vlp_jax") and u.find_spec("jax") else 1)' >/dev/null 2>&1
}

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
else
  PY=""
  for _vlp_candidate in "$(command -v python3 || true)" "$(command -v python || true)"; do
    if [ -n "$_vlp_candidate" ] && _vlp_can_run "$_vlp_candidate"; then
      PY=$_vlp_candidate
      break
    fi
  done
  if [ -z "$PY" ] && [ ! -x .venv/bin/python ] && [ "${VLP_MAKE_VENV:-0}" = 1 ]; then
    make venv >&2
  fi
  if [ -z "$PY" ] && [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
  fi
  if [ -z "$PY" ]; then
    echo "no Python with vlp_jax found: python3/python on PATH cannot import vlp_jax and jax," \
      "and there is no .venv/bin/python here. Activate the environment vlp_jax is installed in," \
      "run 'make venv', or set PYTHON=/path/to/python." >&2
    exit 127
  fi
fi
unset -f _vlp_can_run
unset _vlp_candidate
