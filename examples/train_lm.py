"""The main job: train a small hybrid linear-attention byte-level LM, sequence parallel.

    spcompile run --nproc 2 examples/train_lm.py [--steps N] [--out DIR]     (or torchrun)
    python examples/train_lm.py                                              (one process)

Data: the Python standard library's own ``.py`` files, read as bytes (every machine with
Python has them). Model: byte embedding → layers alternating RetNet-style retention (a fixed
per-head decay mask, masked quadratic form) and a Mamba2-style block (causal depthwise conv1d +
SSD with ``exp(segsum(A·dt))``) → byte logits → cross-entropy. Written for one device; the
``sp`` backend makes it sequence parallel: every rank feeds its contiguous slice of each
window, the scans hand their states across ranks, the conv gets a halo, the loss is the global
mean.

Before training, the script checks that one sharded step equals the single-process step on the
full sequence (loss and every parameter gradient, summed over ranks) and prints PASS/FAIL;
on FAIL it exits with status 1. Then it trains, printing loss and tokens/s with a progress
bar, and writes ``loss.png`` and ``metrics.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import List, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import spcompile  # noqa: E402
from _common import init_distributed  # noqa: E402


# ---------------------------------------------------------------- data
def stdlib_bytes(max_bytes: int) -> torch.Tensor:
    """The standard library's .py sources (sorted paths, no site-packages), as uint8 bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: List[bytes] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total < 1 << 16:
        raise SystemExit(f"train_lm: found only {total} bytes of Python source under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def batch(data: torch.Tensor, B: int, T: int, gen: torch.Generator
          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """B random windows: inputs [B, T] and next-byte targets [B, T] (same on every rank)."""
    starts = torch.randint(0, data.numel() - T - 1, (B,), generator=gen)
    x = torch.stack([data[s:s + T] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + T + 1] for s in starts.tolist()])
    return x, y


# ---------------------------------------------------------------- model
class Retention(nn.Module):
    """RetNet multi-scale retention, parallel form: (Q Kᵀ ⊙ D) V with D[n, m] = γ^(n-m)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.h, self.dk = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.g = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        gamma = 1 - 2 ** (-5 - torch.arange(heads, dtype=torch.float))
        self.register_buffer("gamma", gamma, persistent=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, self.dk).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        k = k * self.dk ** -0.5
        index = torch.arange(T, device=x.device)
        exponent = (index[:, None] - index[None, :]).float()
        exponent = exponent.masked_fill(index[:, None] < index[None, :], float("inf"))
        decay = torch.pow(self.gamma[:, None, None], exponent)  # [H, T, T]
        o = ((q @ k.transpose(-1, -2)) * decay) @ v
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.o(F.silu(self.g(x)) * o.transpose(1, 2).reshape(B, T, D))


def segsum(x: torch.Tensor) -> torch.Tensor:
    T = x.size(-1)
    cs = torch.cumsum(x, dim=-1)
    out = cs[..., :, None] - cs[..., None, :]
    return out.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device)),
                           -torch.inf)


class MambaMixer(nn.Module):
    """Mamba2-style: in-projection, causal depthwise conv1d, SSD scan, gate."""

    def __init__(self, d: int, heads: int, d_state: int = 16, d_conv: int = 4):
        super().__init__()
        self.h, self.n, self.p = heads, d_state, d // heads
        conv_dim = d + 2 * heads * d_state
        self.in_proj = nn.Linear(d, d + conv_dim + heads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, heads)))
        self.dt_bias = nn.Parameter(torch.full((heads,), -2.0))
        self.out_proj = nn.Linear(d, d, bias=False)

    def forward(self, u):
        b, T, d = u.shape
        z, xBC, dt = torch.split(self.in_proj(u), [d, d + 2 * self.h * self.n, self.h], dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :T].transpose(1, 2))
        x, B, C = torch.split(xBC, [d, self.h * self.n, self.h * self.n], dim=-1)
        x, B, C = (x.view(b, T, self.h, self.p), B.view(b, T, self.h, self.n),
                   C.view(b, T, self.h, self.n))
        dt = F.softplus(dt + self.dt_bias)
        L = torch.exp(segsum((-torch.exp(self.A_log) * dt).transpose(1, 2)))  # [b, H, T, T]
        scores = torch.einsum("bthn,bshn->bhts", C, B) * L
        y = torch.einsum("bhts,bshp->bthp", scores, x * dt[..., None])
        return self.out_proj(y.reshape(b, T, d) * F.silu(z))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, kind: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mixer = Retention(d, heads) if kind == "retention" else MambaMixer(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.mixer(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4, layers: int = 4, vocab: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, heads, "retention" if i % 2 == 0 else "mamba")
                                     for i in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def factory():
    """For the CLI: ``spcompile explain examples/train_lm.py:factory --world-size 4``."""
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (2, 257))
    return ByteLM(), (idx[:, :-1].contiguous(), idx[:, 1:].contiguous())


# ---------------------------------------------------------------- the equivalence check
def check_step(model: nn.Module, compiled, x, y, rank: int, P: int, tol: float) -> bool:
    """One sharded (compiled) step vs the single-process eager step on the full windows."""
    ref_model = copy.deepcopy(model)
    ref_loss = ref_model(x, y)
    ref_loss.backward()
    loss = compiled(spcompile.shard_sequence(x, 1), spcompile.shard_sequence(y, 1))
    loss.backward()
    spcompile.sync_gradients(model)
    errs = {"loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())}
    worst, worst_name = 0.0, ""
    for (name, p), (_, rp) in zip(model.named_parameters(), ref_model.named_parameters()):
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        e = ((g - rp.grad).abs().max() / rp.grad.abs().max().clamp_min(1e-8)).item()
        if e > worst:
            worst, worst_name = e, name
    errs["grads"] = worst
    ok = all(e <= tol for e in errs.values())
    flag = torch.tensor([0.0 if ok else 1.0])
    if dist.is_initialized():
        dist.all_reduce(flag)
    ok = flag.item() == 0
    if rank == 0:
        print(f"equivalence check (P={P} sharded compiled step vs 1-process eager step, "
              f"T={x.shape[1]}): loss rel err {errs['loss']:.1e}, worst grad rel err "
              f"{errs['grads']:.1e} ({worst_name}), tol {tol:.0e} -> {'PASS' if ok else 'FAIL'}",
              flush=True)
    model.zero_grad(set_to_none=True)
    return ok


# ---------------------------------------------------------------- training
@torch.no_grad()
def generate(model: nn.Module, prompt: bytes, n: int, max_len: int, temperature: float = 0.7
             ) -> bytes:
    """Sample bytes from the (uncompiled, single-process) model."""
    gen = torch.Generator().manual_seed(0)
    seq = list(prompt)
    for _ in range(n):
        idx = torch.tensor([seq[-max_len:]])
        x = model.embed(idx)
        for block in model.blocks:
            x = block(x)
        logits = model.head(model.ln(x))[0, -1] / temperature
        seq.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
    return bytes(seq)


def progress(step: int, total: int, width: int = 24) -> str:
    done = int(width * step / total)
    return "[" + "#" * done + "." * (width - done) + "]"


def save_curve(out: Path, steps: List[int], losses: List[float], P: int, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, lw=1, alpha=0.5, label="train loss (per step)")
    k = max(1, len(losses) // 20)
    if len(losses) >= 2 * k:
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=2, label=f"moving average ({k} steps)")
    ax.axhline(math.log(256), ls="--", c="gray", lw=1, label="uniform over bytes (ln 256)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=250, help="optimizer steps (default 250)")
    p.add_argument("--batch", type=int, default=8, help="windows per step (default 8)")
    p.add_argument("--seq-len", type=int, default=256,
                   help="GLOBAL window length in bytes; each rank gets seq-len/P (default 256)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--strategy", default="auto", choices=["auto", "allgather", "allscan", "ring"],
                   help="state hand-off of the scans (default: the cost model's choice)")
    p.add_argument("--data-bytes", type=int, default=8 << 20,
                   help="bytes of stdlib source to read (default 8 MiB)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--check-tol", type=float, default=1e-3,
                   help="relative tolerance of the start-up equivalence check")
    p.add_argument("--skip-check", action="store_true", help="skip the equivalence check")
    p.add_argument("--out", default="out/train_lm", help="where loss.png and metrics.json go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=4,
                   help="held-out batches (the last 5%% of the bytes) evaluated before and after")
    p.add_argument("--sample", type=int, default=160,
                   help="bytes to generate at the end from the prompt 'def ' (0: none)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, P = init_distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // P))
    if args.seq_len % P:
        raise SystemExit(f"train_lm: --seq-len {args.seq_len} is not divisible by {P} ranks")
    data = stdlib_bytes(args.data_bytes)
    n_val = max(data.numel() // 20, 4 * args.seq_len)
    data, val_data = data[:-n_val], data[-n_val:]  # held out: the last files read
    torch.manual_seed(args.seed)
    model = ByteLM(args.d_model, args.heads, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"train_lm: {data.numel() / 2 ** 20:.1f} MiB of stdlib source, model "
              f"{n_params / 1e3:.0f}K params ({args.layers} layers, d={args.d_model}), "
              f"{P} rank(s), windows {args.batch}x{args.seq_len} bytes "
              f"({args.seq_len // P} per rank)", flush=True)
    be = spcompile.backend(strategy=args.strategy)
    compiled = torch.compile(model, backend=be)
    gen = torch.Generator().manual_seed(args.seed + 1)  # same windows on every rank

    t0 = time.perf_counter()
    if not args.skip_check:
        x, y = batch(data, args.batch, args.seq_len, gen)
        if not check_step(model, compiled, x, y, rank, P, args.check_tol):
            if dist.is_initialized():
                dist.destroy_process_group()
            return 1
    if rank == 0:
        print(f"compiled in {time.perf_counter() - t0:.1f} s; plan:", flush=True)
        for rep in be.reports:
            for m in rep.matches:
                print(f"  {m.kind:<12} {m.pattern:<24} {m.strategy:<14} {m.source}")
            for f in rep.fallbacks:
                print(f"  fallback: {f}")

    val_gen = torch.Generator().manual_seed(args.seed + 2)
    val_batches = [batch(val_data, args.batch, args.seq_len, val_gen)
                   for _ in range(args.eval_batches)]

    def evaluate() -> float:
        # same graph as training (grad mode on, no backward): no recompilation
        losses = [compiled(spcompile.shard_sequence(x, 1), spcompile.shard_sequence(y, 1)).item()
                  for x, y in val_batches]
        return sum(losses) / max(len(losses), 1)

    val_before = evaluate() if val_batches else float("nan")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=0.1)
    steps, losses = [], []
    tokens_per_step = args.batch * args.seq_len
    t_start = time.perf_counter()
    t_last, n_last = t_start, 0
    for step in range(1, args.steps + 1):
        x, y = batch(data, args.batch, args.seq_len, gen)
        loss = compiled(spcompile.shard_sequence(x, 1), spcompile.shard_sequence(y, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        spcompile.sync_gradients(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        steps.append(step)
        losses.append(loss.item())
        if rank == 0 and (step % args.log_every == 0 or step == 1 or step == args.steps):
            now = time.perf_counter()
            tps = (step - n_last) * tokens_per_step / max(now - t_last, 1e-9)
            t_last, n_last = now, step
            recent = losses[-args.log_every:]
            print(f"{progress(step, args.steps)} step {step:>4}/{args.steps}  loss "
                  f"{sum(recent) / len(recent):.3f}  {tps / 1e3:6.1f}K tok/s  "
                  f"{now - t_start:6.1f} s", flush=True)
    elapsed = time.perf_counter() - t_start
    val_after = evaluate() if val_batches else float("nan")
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        k = max(1, min(10, len(losses) // 3))  # first and last k steps do not overlap
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        png = save_curve(out, steps, losses, P,
                         f"byte LM on stdlib source, {P} rank(s), T={args.seq_len}")
        metrics = dict(world_size=P, steps=args.steps, seq_len=args.seq_len, batch=args.batch,
                       params=n_params, first_loss=first, final_loss=last,
                       val_loss_before=val_before, val_loss_after=val_after,
                       tokens_per_s=args.steps * tokens_per_step / elapsed, seconds=elapsed,
                       losses=losses, plan=[(m.kind, m.pattern, m.strategy)
                                            for r in be.reports for m in r.matches])
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        print(f"done: loss {first:.3f} (first {k} steps) -> {last:.3f} (last {k}), "
              f"{metrics['tokens_per_s'] / 1e3:.1f}K tok/s over {elapsed:.0f} s; wrote {png} "
              f"and {out / 'metrics.json'}", flush=True)
        print(f"held-out loss (last 5% of the bytes, {args.eval_batches} batches): "
              f"{val_before:.3f} before training -> {val_after:.3f} after", flush=True)
        if args.sample > 0:
            text = generate(model, b"def ", args.sample, args.seq_len)
            print("sample (eager model on one process, temperature 0.7):\n" +
                  text.decode("utf-8", errors="replace"), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
