"""One step-time estimator with stated bounds, for every compiled program (docs/aot.md).

Terms, per device and per call, each from one named source:

* **compute** = model FLOPs / the chip's peak bf16 FLOP/s.  Model FLOPs
  (:func:`train_model_flops`) count what the model needs, not what XLA executes: per tower
  pass, 2 × (matmul parameters a token passes through) × tokens + the attention's 4·T²·W per
  layer and sequence, × 3 for the passes that are differentiated (forward + two backward
  matmuls) — i.e. "6 × params × tokens + attention" — plus the heads at their positions and
  the contrastive / bank scores.  Rematerialisation, padding and masked-out work are not model
  FLOPs; XLA's own count (which includes them) gives the *hardware* utilisation instead.
* **memory traffic**, a range: the lower bound is what must move — the donated state read and
  written once, the other arguments read once, non-donated outputs written once, and every
  byte of XLA's temporary allocation written once and read once (a buffer that is never read
  would have been removed); the upper bound is XLA's "bytes accessed", the sum of every
  (fused) op's inputs and outputs, which counts values that stay in VMEM/vregs.
* **ICI** = the collectives' bytes over the chip's ICI bandwidth, with ring-algorithm volume
  factors on the data axis of n devices: all-reduce 2(n−1)/n × bytes, all-gather and
  all-to-all (n−1)/n × result, reduce-scatter (n−1) × result, collective-permute 1×.  It
  assumes a collective can use every link of the chip (a lower bound on its time); generations
  without a published per-chip ICI figure (v4) have no ICI term.

Step time = [max(compute, memory lower, ICI), max(compute, memory upper, ICI)]: perfect overlap
of the three, and the range comes from the memory bound.  The term that dominates each end is
named.  MFU = model FLOPs / (time × peak), a range; hardware utilisation = XLA FLOPs / (time ×
peak).  XLA's cost-model ``optimal_seconds`` is reported as its own column and never used
(it returns negative times for some programs).
"""

from __future__ import annotations

from typing import Any

FACTORS = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
           "all-to-all": lambda n: (n - 1) / n, "reduce-scatter": lambda n: float(n - 1),
           "collective-permute": lambda n: 1.0}


def ici_bytes(collective_list: list[dict[str, Any]], n: int) -> float:
    """Bytes one device sends over ICI for the program's collectives (ring volumes)."""
    if n <= 1:
        return 0.0
    return float(sum(FACTORS.get(c["kind"], lambda n: 1.0)(n) * c["bytes"] * c["executions"]
                     for c in collective_list))


def memory_lower_bytes(p: dict[str, Any]) -> float:
    """Bytes that must cross HBM given the compiled buffers (module docstring)."""
    donated = p["alias_bytes"]
    return float(2 * donated + (p["argument_bytes"] - donated)
                 + (p["output_bytes"] - donated) + 2 * p["temp_bytes"])


def estimate(p: dict[str, Any], chip: dict[str, Any], data_devices: int,
             model_flops: float | None) -> dict[str, Any]:
    """The estimate of one compiled program's report ``p`` (analysis.compile_program's dict);
    ``model_flops``: per device per call (None = unknown: compute from XLA's FLOPs, said so)."""
    peak = chip["peak_bf16_flops"]
    xla_flops = float(p["flops_per_device"])
    flops = xla_flops if model_flops is None else float(model_flops)
    ici_bw = chip.get("ici_bytes_per_s")
    comm = ici_bytes(p.get("collective_list", []), data_devices)
    terms_lo = {"compute": flops / peak,
                "memory": memory_lower_bytes(p) / chip["hbm_bytes_per_s"],
                "ici": comm / ici_bw if ici_bw else 0.0}
    terms_hi = dict(terms_lo, memory=float(p["bytes_accessed_per_device"])
                    / chip["hbm_bytes_per_s"])
    lo, hi = max(terms_lo.values()), max(terms_hi.values())
    out = {
        "model_flops_per_device": flops,
        "flops_source": "XLA (model FLOPs unknown)" if model_flops is None else "model",
        "memory_lower_bytes": memory_lower_bytes(p),
        "ici_bytes_per_device": comm,
        "ici_term": "n/a (no per-chip ICI figure)" if not ici_bw else "ring volumes",
        "terms_lower_s": terms_lo, "terms_upper_s": terms_hi,
        "step_seconds_range": [lo, hi],
        "bound_lower": max(terms_lo, key=terms_lo.get),
        "bound_upper": max(terms_hi, key=terms_hi.get),
        "cost_model_seconds": float(p.get("optimal_seconds", -1.0)),
    }
    if lo > 0:
        out["rows_per_second_range"] = [p["rows"] / hi, p["rows"] / lo]
        out["mfu_range"] = [flops / hi / peak, flops / lo / peak]
        # the hardware executes XLA's FLOPs (recomputation included): no faster than those
        hw_lo = max(lo, xla_flops / peak)
        out["hfu_range"] = [xla_flops / max(hi, hw_lo) / peak, xla_flops / hw_lo / peak]
    return out


def _encoder_flops(tokens: int, depth: int, width: int, mlp: int, rows: int) -> float:
    """Forward FLOPs of ``depth`` transformer layers on ``rows`` sequences of ``tokens``."""
    per_token = depth * (4 * width * width + 2 * width * mlp)
    return 2.0 * per_token * tokens * rows + 4.0 * depth * tokens * tokens * width * rows


def train_model_flops(config: Any, vocab_size: int) -> dict[str, float]:
    """Model FLOPs of one train step (global, all devices), by part (module docstring).

    Reads the model the config builds (``models.make_model``: patch count, MLM caps, which
    heads exist), so it follows every switch the step does.
    """
    from vlp_jax.models import make_model

    model = make_model(config, vocab_size=vocab_size)
    m, b = config.model, int(config.train.batch_size)
    w = int(m.width)
    mlp = int(m.mlp_dim or m.mlp_ratio * w)
    q_depth = m.depth if m.shared_query_encoder else m.query_depth
    q_mlp = int(m.query_mlp_dim or mlp) if not m.shared_query_encoder else mlp
    n = model.num_patches + int(bool(m.image_cls)) if m.use_image else 0
    item_tokens = model.max_title_len + n
    patch = 2.0 * model.patch_dim * w * model.num_patches * b if m.use_image else 0.0
    item = _encoder_flops(item_tokens, m.depth, w, mlp, b) + patch
    query = _encoder_flops(model.max_query_len, q_depth, w, q_mlp, b)
    head = 2.0 * (w * w + w * vocab_size)  # MLM transform + decoder, per predicted position
    parts = {"query_tower": 3 * query, "item_tower": 3 * item,
             "projections": 3 * 2.0 * w * int(m.embed_dim) * 2 * b}
    if model.compute_title_mlm or model.mpm_type != "none":
        masked = item
        if model.compute_title_mlm:
            masked += head * (model.title_mlm_predictions or model.max_title_len) * b
        if model.mpm_type != "none":
            out_dim = w if model.mpm_type == "contrastive" else model.patch_dim
            masked += 2.0 * (w * w + w * out_dim) * model.num_patches * b
        parts["masked_item_pass"] = 3 * masked
    if model.compute_query_mlm:
        parts["query_mlm_pass"] = 3 * (query + head * (model.query_mlm_predictions
                                                       or model.max_query_len) * b)
    neg = config.negatives
    keys = b + int(neg.bank_size)
    parts["scores"] = 3 * 2.0 * int(m.embed_dim) * b * (keys + (b if config.loss.symmetric
                                                                else 0))
    if float(neg.momentum) > 0:  # the momentum tower's forward pass (no gradient)
        parts["momentum_forward"] = item + 2.0 * w * int(m.embed_dim) * b
    parts["total"] = float(sum(parts.values()))
    return parts


def encoder_model_flops(config: Any, vocab_size: int, kind: str, rows: int) -> float:
    """Forward model FLOPs of the item or query encoder on ``rows`` examples (eval, serving)."""
    from vlp_jax.models import make_model

    model = make_model(config, vocab_size=vocab_size)
    m = config.model
    w = int(m.width)
    mlp = int(m.mlp_dim or m.mlp_ratio * w)
    proj = 2.0 * w * int(m.embed_dim) * rows
    if kind == "query":
        depth = m.depth if m.shared_query_encoder else m.query_depth
        q_mlp = int(m.query_mlp_dim or mlp) if not m.shared_query_encoder else mlp
        return _encoder_flops(model.max_query_len, depth, w, q_mlp, rows) + proj
    n = model.num_patches + int(bool(m.image_cls)) if m.use_image else 0
    patch = 2.0 * model.patch_dim * w * model.num_patches * rows if m.use_image else 0.0
    return _encoder_flops(model.max_title_len + n, m.depth, w, mlp, rows) + patch + proj
