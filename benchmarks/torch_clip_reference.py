"""The open_clip-style PyTorch eager step at the matched size: the number issue #8 must beat.

Same model as ``benchmarks/clip_reference.py`` (ViT 64 px / 16, width 192, 4 layers, 3 heads;
causal text transformer, width 192, 4 layers, 32 tokens, vocab 30,522; symmetric InfoNCE with a
learned logit scale; AdamW), written the way open_clip writes it: ``nn.MultiheadAttention``,
``nn.LayerNorm``, exact ``nn.GELU``, eager mode.  PyTorch is not a dependency of vlp_jax; run this
in any environment that has it (``pip install torch --index-url .../cpu``):

    python benchmarks/torch_clip_reference.py --batch_sizes=64,256

MFU uses the JAX reference's FLOPs per step (XLA cost analysis of the same model, read from
``benchmarks/results/train_throughput.json``) over a float32 matmul peak measured here with
torch, so the two numbers are comparable.  Writes ``benchmarks/results/torch_clip_reference.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

WIDTH, LAYERS, HEADS, TEXT_LEN, VOCAB, IMAGE, PATCH = 192, 4, 3, 32, 30522, 64, 16
HERE = os.path.dirname(os.path.abspath(__file__))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.ln_2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(
            nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH)
        )

    def forward(self, x, attn_mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Clip(nn.Module):
    def __init__(self):
        super().__init__()
        n = (IMAGE // PATCH) ** 2
        self.patch = nn.Linear(PATCH * PATCH * 3, WIDTH, bias=False)
        self.cls = nn.Parameter(torch.randn(WIDTH) * 0.02)
        self.v_pos = nn.Parameter(torch.randn(n + 1, WIDTH) * 0.02)
        self.ln_pre = nn.LayerNorm(WIDTH)
        self.v_blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_post = nn.LayerNorm(WIDTH)
        self.v_proj = nn.Parameter(torch.randn(WIDTH, WIDTH) * WIDTH**-0.5)
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.t_pos = nn.Parameter(torch.randn(TEXT_LEN, WIDTH) * 0.01)
        self.t_blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_final = nn.LayerNorm(WIDTH)
        self.t_proj = nn.Parameter(torch.randn(WIDTH, WIDTH) * WIDTH**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))
        self.register_buffer("causal", torch.full((TEXT_LEN, TEXT_LEN), float("-inf")).triu(1))

    def forward(self, patches, tokens):
        x = self.patch(patches)
        x = torch.cat([self.cls.expand(x.shape[0], 1, WIDTH), x], dim=1) + self.v_pos
        x = self.ln_pre(x)
        for block in self.v_blocks:
            x = block(x)
        img = F.normalize(self.ln_post(x[:, 0]) @ self.v_proj, dim=-1)
        t = self.tok(tokens) + self.t_pos
        for block in self.t_blocks:
            t = block(t, self.causal)
        t = self.ln_final(t)
        txt = F.normalize(t[torch.arange(t.shape[0]), tokens.argmax(-1)] @ self.t_proj, dim=-1)
        logits = self.logit_scale.exp() * img @ txt.T
        labels = torch.arange(logits.shape[0])
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def matmul_peak(n: int = 2048, repeats: int = 20) -> float:
    a = torch.randn(n, n)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def step_seconds(batch_size: int, steps: int) -> list[float]:
    """Seconds of each timed step (the median is reported, as in train_throughput.py)."""
    torch.manual_seed(0)
    model = Clip()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    patches = torch.randn(batch_size, (IMAGE // PATCH) ** 2, PATCH * PATCH * 3)
    tokens = torch.randint(1, VOCAB - 1, (batch_size, TEXT_LEN))
    tokens[:, -1] = VOCAB - 1  # EOT has the largest id, as in clip_reference.py

    def step():
        opt.zero_grad(set_to_none=True)
        model(patches, tokens).backward()
        opt.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def jax_reference_gflops(path: str) -> dict[int, float]:
    """GFLOP/step of the JAX CLIP reference per batch size, from train_throughput's JSON."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = json.load(f)["rows"]
    return {r["batch_size"]: r["step_gflops"] for r in rows if r["model"] == "clip_reference"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_sizes", default="64,256")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--jax_results", default=os.path.join(HERE, "results/train_throughput.json")
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results/torch_clip_reference.json"))
    args = parser.parse_args()
    peak = matmul_peak()
    gflops = jax_reference_gflops(args.jax_results)
    rows = []
    for b in (int(x) for x in args.batch_sizes.split(",")):
        times = step_seconds(b, args.steps)
        dt = statistics.median(times)
        fl = gflops.get(b)
        rows.append({"batch_size": b, "ms_per_step": dt * 1e3,
                     "ms_per_step_mean": statistics.mean(times) * 1e3, "examples_per_sec": b / dt,
                     "step_gflops": fl, "mfu": fl * 1e9 / dt / peak if fl else None})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s")
    for r in rows:
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] else "n/a (no JAX FLOPs for this batch)"
        print(f"batch {r['batch_size']:>4}: {r['ms_per_step']:8.1f} ms/step "
              f"{r['examples_per_sec']:7.1f} ex/s  MFU {mfu}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                   "matmul_peak_gflops": peak / 1e9, "rows": rows}, f, indent=2)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
