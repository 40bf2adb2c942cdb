#!/usr/bin/env bash
# Creates the optional PyTorch + open_clip environment that benchmarks/open_clip_peer.py times.
#
# PyTorch is not a dependency of vlp_jax, so the peer gets its own venv (git-ignored):
#
#   bash benchmarks/peer_env.sh                   # -> .peer_venv/ under the repo root
#   PEER_VENV=/elsewhere bash benchmarks/peer_env.sh
#   PEER_TORCH='torch==2.13.0+cpu' bash ...       # pin a torch build (e.g. a local CPU wheel)
#
# torch comes from PyTorch's CPU-only index when it is reachable (a ~200 MB wheel); otherwise
# from PyPI, whose Linux wheel is the CUDA build and pulls ~2.6 GB of nvidia-* wheels that stay
# unused on a CPU (the CPU kernels, MKL and oneDNN, are the same in both builds).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEER_VENV=${PEER_VENV:-$REPO/.peer_venv}
PYTHON=${PYTHON:-python3}
OPEN_CLIP=${OPEN_CLIP_VERSION:-3.3.0}
CPU_INDEX=https://download.pytorch.org/whl/cpu

"$PYTHON" -m venv "$PEER_VENV"
PY=$PEER_VENV/bin/python
pip_install() { "$PY" -m pip install -q "$@"; }

if [[ -n "${PEER_TORCH:-}" ]]; then
  echo "torch: $PEER_TORCH (PEER_TORCH)"
  pip_install "$PEER_TORCH" torchvision "open_clip_torch==$OPEN_CLIP" numpy
elif "$PY" -c "import urllib.request as u; u.urlopen('$CPU_INDEX/torch/', timeout=15)" 2>/dev/null
then
  echo "torch: CPU-only wheels from $CPU_INDEX"
  pip_install torch torchvision --index-url "$CPU_INDEX"
  pip_install "open_clip_torch==$OPEN_CLIP" numpy
else
  echo "torch: $CPU_INDEX unreachable, installing PyPI's torch (CUDA build, runs on CPU)"
  pip_install torch torchvision "open_clip_torch==$OPEN_CLIP" numpy
fi

"$PY" - <<'EOF'
import numpy, open_clip, torch
print(f"torch {torch.__version__}, open_clip {open_clip.__version__}, numpy {numpy.__version__}")
EOF
echo "venv: $PEER_VENV ($(du -sh "$PEER_VENV" | cut -f1))"
if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4; then
  echo "libtcmalloc_minimal.so.4 not found: the tcmalloc arms need 'apt-get install" \
       "libtcmalloc-minimal4' (make venv installs it when it can)"
fi
