"""Dense layers that hand XLA two-dimensional matmuls (a large speed-up of the CPU backward pass).

Why this exists (issue #8, found with per-op profiles of the base train step): ``nn.Dense`` on a
[B, L, K] activation is one dot_general contracting K.  Its weight gradient then contracts the
*two* leading axes (B, L) of both operands, and XLA:CPU lowers that by first copying the
incoming gradient into a transposed [N, B, L] layout and then calling Eigen with a transposed
left operand: ~35 GFLOP/s per core on this 2-core EPYC.  Flattening the activation to
[B*L, K] first makes the same weight gradient a plain ``x^T @ dy`` over one axis, with no copy,
at ~2x the speed (fc1's forward+backward at batch 256: 43 ms -> 25 ms).  The reshapes are free
(row-major bitcasts), the FLOPs and the values are identical, and the parameters are unchanged
(``kernel`` [in, out], ``bias`` [out]), so checkpoints and the HF converter are unaffected.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
from jax import lax


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.dot_general`` for ``nn.Dense``: a rank>2 ``x [..., K] @ kernel [K, N]`` runs as
    ``x.reshape(-1, K) @ kernel``; any other contraction goes to ``lax.dot_general`` unchanged."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    flat = (
        lhs.ndim > 2 and rhs.ndim == 2 and not lhs_batch and not rhs_batch
        and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
    )
    if not flat:
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
    rows = math.prod(lhs.shape[:-1])
    out = lax.dot_general(lhs.reshape(rows, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())),
                          precision=precision, preferred_element_type=preferred_element_type)
    return out.reshape(*lhs.shape[:-1], rhs.shape[1])


def tied_decoder(x: jax.Array, table: jax.Array) -> jax.Array:
    """``x [..., W] @ table [V, W]^T``: a tied MLM decoder, flattened for the same reason."""
    return dot_general(x, table.T, (((x.ndim - 1,), (0,)), ((), ())))


Dense = functools.partial(nn.Dense, dot_general=dot_general)
"""``nn.Dense`` computing through :func:`dot_general`: same parameters, same values."""
