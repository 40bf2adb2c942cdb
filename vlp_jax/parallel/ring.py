"""Ring reduction of pairwise scores over the ``data`` axis, with a memory-lean custom VJP.

Why a ring: with gathered negatives each device materialises a ``b × N·b`` logits block, and
under plain autodiff it also keeps the gathered ``N·b × d`` embeddings (and the logits) as
residuals for the backward pass, so memory grows with the device count.  Here each device keeps
its ``b`` *row* vectors fixed while the ``b`` *column* blocks travel round the ring with
``lax.ppermute``; a device only ever holds one ``b × b`` block of scores.  The forward pass folds
the blocks into an online log-sum-exp (running max + rescaled sum) or a plain sum.  The backward
pass goes round the ring a second time, recomputes each block, and sends the columns' gradient
round *with* the block, so that after a full circle every device holds the gradient of its own
columns — the same trick as ring attention.  Nothing of size ``N·b`` is ever stored.

Must be called inside ``jax.shard_map`` over ``axis_name`` (with ``check_vma=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

# (rows [b, d], cols [c, d], row_keys [b, k], col_keys [c, k], params, pos_col [b])
#   -> (z [b, c], metric_logits [b, c], neg_mask [b, c])
# ``z`` is what is reduced: masked logits (-inf = not a candidate) for mode "lse", per-pair
# losses for mode "sum".  ``pos_col`` is each row's positive column in this block, -1 if absent.
BlockFn = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


def to_varying(x: jax.Array, axis_name: str) -> jax.Array:
    """Mark ``x`` as device-varying (no-op if it already is), as loop carries must agree."""
    aval = jax.typeof(x)
    varying = aval.mat.varying if hasattr(aval, "mat") else aval.vma  # jax 0.10 | older
    if axis_name in varying:
        return x
    return jax.lax.pcast(x, axis_name, to="varying")


def _perm(n: int) -> list[tuple[int, int]]:
    return [(j, (j + 1) % n) for j in range(n)]


def _pos_col(step: jax.Array, b: int) -> jax.Array:
    """Columns come from device ``i - step``; the row's own positive is in block 0 only."""
    return jnp.where(step == 0, jnp.arange(b), -1)


def _init_acc(mode: str, b: int, axis_name: str):
    zeros = jnp.zeros((b,), jnp.float32)
    first = jnp.full((b,), -jnp.inf, jnp.float32) if mode == "lse" else zeros
    acc = (first, zeros, zeros, zeros, jnp.full((b,), -jnp.inf, jnp.float32))
    return tuple(to_varying(a, axis_name) for a in acc)


def _fold(mode: str, acc, z, metric, neg):
    """Fold one block into (max|sum, sumexp, neg_sum, neg_count, neg_max)."""
    first, sumexp, neg_sum, neg_cnt, neg_max = acc
    if mode == "lse":
        new_max = jnp.maximum(first, jnp.max(z, axis=1))
        safe = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        sumexp = sumexp * jnp.exp(first - safe) + jnp.sum(jnp.exp(z - safe[:, None]), axis=1)
        first = new_max
    else:
        first = first + jnp.sum(z, axis=1)
    negf = neg.astype(jnp.float32)
    neg_sum = neg_sum + jnp.sum(metric * negf, axis=1)
    neg_cnt = neg_cnt + jnp.sum(negf, axis=1)
    neg_max = jnp.maximum(neg_max, jnp.max(jnp.where(neg, metric, -jnp.inf), axis=1))
    return first, sumexp, neg_sum, neg_cnt, neg_max


def _finish(mode: str, acc):
    first, sumexp, neg_sum, neg_cnt, neg_max = acc
    if mode == "lse":
        safe = jnp.where(jnp.isfinite(first), first, 0.0)
        out = jnp.where(sumexp > 0, safe + jnp.log(jnp.where(sumexp > 0, sumexp, 1.0)), -jnp.inf)
    else:
        out = first
    return out, neg_sum, neg_cnt, neg_max


def _ring_forward(block_fn, mode, axis_name, n, rows, cols, row_keys, col_keys, params):
    b = rows.shape[0]

    def compute(step, cols_blk, keys_blk, acc):
        z, metric, neg = block_fn(rows, cols_blk, row_keys, keys_blk, params, _pos_col(step, b))
        return _fold(mode, acc, z, metric, neg)

    def body(step, carry):
        cols_blk, keys_blk, acc = carry
        acc = compute(step, cols_blk, keys_blk, acc)
        cols_blk, keys_blk = jax.lax.ppermute((cols_blk, keys_blk), axis_name, _perm(n))
        return cols_blk, keys_blk, acc

    carry = (cols, col_keys, _init_acc(mode, b, axis_name))
    cols_blk, keys_blk, acc = jax.lax.fori_loop(0, n - 1, body, carry)
    acc = compute(n - 1, cols_blk, keys_blk, acc)
    return _finish(mode, acc)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def ring_reduce(
    block_fn: BlockFn,
    mode: str,
    axis_name: str,
    n: int,
    rows: jax.Array,
    cols: jax.Array,
    row_keys: jax.Array,
    col_keys: jax.Array,
    params: tuple[jax.Array, ...],
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Reduce ``block_fn`` over all N column blocks of the ring, per local row.

    Args:
      block_fn: see ``BlockFn``; must be a module-level function (it is a static argument).
      mode: "lse" (log-sum-exp of ``z`` over every column of every device) or "sum".
      axis_name: the mesh axis of the ring; n: its size.
      rows: [b, d] this device's fixed rows; cols: [b, d] this device's column block.
      row_keys, col_keys: [b, k] int keys ``block_fn`` uses for masks (no gradient).
      params: tuple of float scalars (e.g. scale, margin, bias); pass them device-varying
        (``to_varying``) so their per-device cotangents are summed by the caller's transpose.

    Returns:
      ``(out, neg_sum, neg_count, neg_max)``, each [b].  Only ``out`` is differentiable; the
      rest are statistics of ``metric_logits`` over ``neg_mask`` for logging.
    """
    return _ring_forward(block_fn, mode, axis_name, n, rows, cols, row_keys, col_keys, params)


def _ring_fwd(block_fn, mode, axis_name, n, rows, cols, row_keys, col_keys, params):
    outs = _ring_forward(block_fn, mode, axis_name, n, rows, cols, row_keys, col_keys, params)
    return outs, (rows, cols, row_keys, col_keys, params, outs[0])


def _ring_bwd(block_fn, mode, axis_name, n, res, cts):
    rows, cols, row_keys, col_keys, params, out = res
    g = cts[0]  # the statistics outputs are for logging only; their cotangents are ignored
    b = rows.shape[0]
    out_safe = jnp.where(jnp.isfinite(out), out, 0.0)

    def surrogate(rows_, cols_blk, params_, keys_blk, pos_col):
        """Scalar whose gradient is this block's share of d(sum g*out)."""
        z, _, _ = block_fn(rows_, cols_blk, row_keys, keys_blk, params_, pos_col)
        if mode == "lse":  # d lse / d z = softmax(z) = exp(z - lse)
            z = jnp.exp(z - jax.lax.stop_gradient(out_safe)[:, None])
        return jnp.sum(g[:, None] * z)

    def compute(step, cols_blk, keys_blk, dcols_blk, drows, dparams):
        grad_fn = jax.grad(surrogate, argnums=(0, 1, 2))
        dr, dc, dp = grad_fn(rows, cols_blk, params, keys_blk, _pos_col(step, b))
        add = partial(jax.tree_util.tree_map, jnp.add)
        return dcols_blk + dc, add(drows, dr), add(dparams, dp)

    def body(step, carry):
        cols_blk, keys_blk, dcols_blk, drows, dparams = carry
        dcols_blk, drows, dparams = compute(step, cols_blk, keys_blk, dcols_blk, drows, dparams)
        cols_blk, keys_blk, dcols_blk = jax.lax.ppermute(
            (cols_blk, keys_blk, dcols_blk), axis_name, _perm(n)
        )
        return cols_blk, keys_blk, dcols_blk, drows, dparams

    zeros = partial(jax.tree_util.tree_map, lambda x: to_varying(jnp.zeros_like(x), axis_name))
    carry = (cols, col_keys, zeros(cols), zeros(rows), zeros(params))
    cols_blk, keys_blk, dcols_blk, drows, dparams = jax.lax.fori_loop(0, n - 1, body, carry)
    dcols_blk, drows, dparams = compute(n - 1, cols_blk, keys_blk, dcols_blk, drows, dparams)
    # The column gradient has visited every device; one last hop takes it home.
    dcols = jax.lax.ppermute(dcols_blk, axis_name, _perm(n))
    return drows, dcols, None, None, dparams


ring_reduce.defvjp(_ring_fwd, _ring_bwd)
