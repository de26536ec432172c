"""Worker side of tests/test_collectives.py: one gloo spawn per world size runs every check.

Each rank builds the *full* problem from a shared seed, runs the distributed op on its shard, and
compares with a single-process reference on the full data (float64, so tolerances are tight).
Results go to ``<outdir>/rank<r>.json`` as records ``{name, err, tol, ok, info}``; the pytest side
asserts them and prints the worst error per check.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import spcompile.collectives as C
from spcompile.kernels.linear_scan import linear_scan

DT = torch.float64


from dist_harness import free_port  # noqa: E402  (one helper for every spawning test)


class Recorder:
    def __init__(self):
        self.records: List[Dict] = []

    def close(self, name: str, got, want, tol: float = 1e-9) -> None:
        if got is None or want is None:
            ok = got is None and want is None
            self.records.append(dict(name=name, err=0.0 if ok else math.inf, tol=tol, ok=ok,
                                     info="None mismatch" if not ok else ""))
            return
        got, want = got.detach().to(DT), want.detach().to(DT)
        if got.shape != want.shape:
            self.records.append(dict(name=name, err=math.inf, tol=tol, ok=False,
                                     info=f"shape {tuple(got.shape)} vs {tuple(want.shape)}"))
            return
        denom = max(1.0, want.abs().max().item()) if want.numel() else 1.0
        err = (got - want).abs().max().item() / denom if want.numel() else 0.0
        ok = bool(err <= tol) and bool(torch.isfinite(got).all())
        self.records.append(dict(name=name, err=err, tol=tol, ok=ok, info=""))

    def true(self, name: str, cond: bool, info: str = "") -> None:
        self.records.append(dict(name=name, err=0.0 if cond else math.inf, tol=0.0,
                                 ok=bool(cond), info=info))


def shard(x: torch.Tensor, dim: int, r: int, P: int) -> torch.Tensor:
    n = x.shape[dim] // P
    return x.narrow(dim, r * n, n)


def leaf(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.detach().clone().requires_grad_()


def grads(loss: torch.Tensor, xs: List[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
    present = [x for x in xs if x is not None and x.requires_grad]
    gs = iter(torch.autograd.grad(loss, present, allow_unused=True))
    out = []
    for x in xs:
        if x is None or not x.requires_grad:
            out.append(None)
        else:
            g = next(gs)
            out.append(torch.zeros_like(x) if g is None else g)
    return out


def sum_over_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    y = x.detach().clone()
    dist.all_reduce(y, group=group)
    return y


# ------------------------------------------------------------------------------- state scan checks

def reference_exclusive_scan(S: torch.Tensor, a: Optional[torch.Tensor]) -> torch.Tensor:
    """S [P, B, H, K, V], a None | [P, B, H] | [P, B, H, K] → incoming [P, ...] (sequential)."""
    out, acc = [], torch.zeros_like(S[0])
    for j in range(S.shape[0]):
        out.append(acc)
        w = None if a is None else a[j].exp()
        if w is not None:
            w = w[..., None, None] if a.dim() == 3 else w[..., None]
        acc = (acc if w is None else w * acc) + S[j]
    return torch.stack(out)


def check_state_scan(rec: Recorder, r: int, P: int) -> None:
    B, H, K, V = 2, 3, 5, 4
    g = torch.Generator().manual_seed(1)
    S = torch.randn(P, B, H, K, V, generator=g, dtype=DT)
    W = torch.randn(P, B, H, K, V, generator=g, dtype=DT)
    decays = {
        "none": None,
        "scalar": -torch.rand(P, B, H, generator=g, dtype=DT) * 2,
        "vector": -torch.rand(P, B, H, K, generator=g, dtype=DT) * 2,
    }
    under = -torch.rand(P, B, H, K, generator=g, dtype=DT)
    under[:, :, 0] = -800.0            # exp underflows to exactly 0 (fp64)
    under[:, 1, 1, 2] = -math.inf      # a decay of exactly zero
    decays["vector_underflow"] = under
    us = -torch.rand(P, B, H, generator=g, dtype=DT)
    us[:, 0, :] = -900.0
    decays["scalar_underflow"] = us
    for kind, a_full in decays.items():
        Sr, ar = leaf(S), leaf(a_full)
        ref = reference_exclusive_scan(Sr, ar)
        gS_ref, ga_ref = grads((ref * W).sum(), [Sr, ar])
        for strategy in C.STRATEGIES:
            for blocks in ((2, 5) if strategy == "allscan" else (None,)):
                tag = f"scan/{strategy}{'' if blocks is None else blocks}/{kind}"
                s_loc, a_loc = leaf(S[r]), leaf(None if a_full is None else a_full[r])
                with C.count_traffic() as t:
                    inc = C.exclusive_state_scan(s_loc, a_loc, strategy=strategy,
                                                 group=dist.group.WORLD, blocks=blocks)
                    gS, ga = grads((inc * W[r]).sum(), [s_loc, a_loc])
                rec.close(tag + "/fwd", inc, ref[r])
                rec.close(tag + "/dstate", gS, gS_ref[r])
                rec.close(tag + "/dlog_decay", ga, None if ga_ref is None else ga_ref[r])
                # traffic vs formula (forward + backward, each moves the same)
                nS = S[r].numel() * 8
                na = 0 if a_full is None else a_full[r].numel() * 8
                if strategy == "allgather":
                    want = (2 * (P - 1) * (nS + na), 2 * (P - 1) * (nS + na))
                else:  # fwd chain r-1 → r → r+1, bwd r+1 → r → r-1: one state each way
                    sent = (nS if r < P - 1 else 0) + (nS if r > 0 else 0)
                    want = (sent, sent)
                got = t.by_strategy.get(strategy, (0, 0))
                rec.true(tag + "/traffic", got == want, f"got {got} want {want}")
                if strategy == "allscan":  # forward alone: exactly one state per rank, last none
                    with C.count_traffic() as t1:
                        C.exclusive_state_scan(S[r], None, strategy="allscan",
                                               group=dist.group.WORLD, blocks=blocks)
                    want1 = (nS if r < P - 1 else 0, nS if r > 0 else 0)
                    rec.true(tag + "/traffic_fwd_one_state", t1.by_strategy["allscan"] == want1,
                             f"got {t1.by_strategy['allscan']} want {want1}")


# --------------------------------------------------------------------------- sp_linear_scan checks

def make_decay(kind: str, B: int, T: int, H: int, K: int, g: torch.Generator):
    if kind == "none":
        return None
    if kind == "head":
        return -torch.rand(H, generator=g, dtype=DT) * 0.5
    if kind == "scalar":
        return -torch.rand(B, T, H, generator=g, dtype=DT) * 0.5
    if kind == "scalar_underflow":
        x = -torch.rand(B, T, H, generator=g, dtype=DT) * 0.5
        x[:, ::3] = -60.0  # below the kernel's floor; shards whose decay vanishes entirely
        return x
    return -torch.rand(B, T, H, K, generator=g, dtype=DT) * 0.5


def check_sp_linear_scan(rec: Recorder, r: int, P: int) -> None:
    B, Tl, H, K, V = 2, 6, 2, 4, 3
    T = Tl * P
    gen = torch.Generator().manual_seed(2)
    for kind in ("none", "head", "scalar", "vector", "scalar_underflow"):
        q, k, v = (torch.randn(B, T, H, d, generator=gen, dtype=DT) for d in (K, K, V))
        g = make_decay(kind, B, T, H, K, gen)
        s0 = torch.randn(B, H, K, V, generator=gen, dtype=DT)
        Wo = torch.randn(B, T, H, V, generator=gen, dtype=DT)
        Ws = torch.randn(P, B, H, K, V, generator=gen, dtype=DT)
        # reference: the full sequence, plus the state at each shard boundary
        ins = [leaf(x) for x in (q, k, v, g, s0)]
        o_ref, _ = linear_scan(ins[0], ins[1], ins[2], ins[3], initial_state=ins[4], chunk_size=4)
        loss = (o_ref * Wo).sum()
        for j in range(P):
            gj = ins[3]
            if gj is not None and gj.dim() > 1:
                gj = gj[:, :(j + 1) * Tl]
            _, sj = linear_scan(ins[0][:, :(j + 1) * Tl], ins[1][:, :(j + 1) * Tl],
                                ins[2][:, :(j + 1) * Tl], gj, initial_state=ins[4],
                                output_final_state=True, chunk_size=4)
            loss = loss + (sj * Ws[j]).sum()
            if j == r:
                s_ref = sj
        ref_grads = grads(loss, ins)
        for strategy in C.STRATEGIES:
            tag = f"sp_scan/{strategy}/{kind}"
            mine = [leaf(shard(q, 1, r, P)), leaf(shard(k, 1, r, P)), leaf(shard(v, 1, r, P)),
                    leaf(g if g is None or g.dim() == 1 else shard(g, 1, r, P)), leaf(s0)]
            o, sf = C.sp_linear_scan(mine[0], mine[1], mine[2], mine[3], initial_state=mine[4],
                                     output_final_state=True, chunk_size=4, strategy=strategy,
                                     group=dist.group.WORLD, blocks=3)
            rec.close(tag + "/o", o, shard(o_ref, 1, r, P))
            rec.close(tag + "/final_state", sf, s_ref)
            gq, gk, gv, gg, gs0 = grads((o * shard(Wo, 1, r, P)).sum() + (sf * Ws[r]).sum(), mine)
            rec.close(tag + "/dq", gq, shard(ref_grads[0], 1, r, P))
            rec.close(tag + "/dk", gk, shard(ref_grads[1], 1, r, P))
            rec.close(tag + "/dv", gv, shard(ref_grads[2], 1, r, P))
            if g is not None:
                want = ref_grads[3] if g.dim() == 1 else shard(ref_grads[3], 1, r, P)
                got = sum_over_ranks(gg) if g.dim() == 1 else gg
                rec.close(tag + "/dlog_decay", got, want)
            rec.close(tag + "/dinitial_state", sum_over_ranks(gs0), ref_grads[4])


# ------------------------------------------------------------------------------------ halo checks

def check_halo(rec: Recorder, r: int, P: int) -> None:
    gen = torch.Generator().manual_seed(3)
    B, Cch, Tl, w = 2, 3, 5, 4
    T = Tl * P
    # Mamba-style causal depthwise conv1d, x [B, C, T], sequence dim 2, halo w-1
    x = torch.randn(B, Cch, T, generator=gen, dtype=DT)
    weight = torch.randn(Cch, 1, w, generator=gen, dtype=DT)
    W = torch.randn(B, Cch, T, generator=gen, dtype=DT)
    xr, wr = leaf(x), leaf(weight)
    y = F.conv1d(F.pad(xr, (w - 1, 0)), wr, groups=Cch)
    gx_ref, gw_ref = grads((y * W).sum(), [xr, wr])
    xs, ws = leaf(shard(x, 2, r, P)), leaf(weight)
    with C.count_traffic() as t:
        h = C.halo_exchange(xs, w - 1, dim=2, group=dist.group.WORLD)
        ys = F.conv1d(torch.cat([h, xs], dim=2), ws, groups=Cch)
        gx, gw = grads((ys * shard(W, 2, r, P)).sum(), [xs, ws])
    rec.close("halo/conv1d/fwd", ys, shard(y, 2, r, P))
    rec.close("halo/conv1d/dx", gx, shard(gx_ref, 2, r, P))
    rec.close("halo/conv1d/dweight", sum_over_ranks(gw), gw_ref)
    nb = B * Cch * (w - 1) * 8
    want = ((nb if r < P - 1 else 0) + (nb if r > 0 else 0),) * 2
    rec.true("halo/traffic", t.by_strategy["halo"] == want, f"{t.by_strategy['halo']} vs {want}")
    # RWKV token shift, x [B, T, C], sequence dim 1, halo 1
    x = torch.randn(B, T, Cch, generator=gen, dtype=DT)
    W = torch.randn(B, T, Cch, generator=gen, dtype=DT)
    xr = leaf(x)
    y = F.pad(xr, (0, 0, 1, -1))
    (gx_ref,) = grads((y * W).sum(), [xr])
    xs = leaf(shard(x, 1, r, P))
    ys = torch.cat([C.halo_exchange(xs, 1, group=dist.group.WORLD), xs[:, :-1]], dim=1)
    (gx,) = grads((ys * shard(W, 1, r, P)).sum(), [xs])
    rec.close("halo/token_shift/fwd", ys, shard(y, 1, r, P))
    rec.close("halo/token_shift/dx", gx, shard(gx_ref, 1, r, P))
    # left shift (HF 5's next-token labels pad(x, (0, 1))[..., 1:]): the next rank's first token
    y = F.pad(xr, (0, 0, 0, 2))[:, 2:]
    (gx_ref,) = grads((y * W).sum(), [xr])
    xs = leaf(shard(x, 1, r, P))
    ys = torch.cat([xs[:, 2:], C.halo_from_next(xs, 2, group=dist.group.WORLD)], dim=1)
    (gx,) = grads((ys * shard(W, 1, r, P)).sum(), [xs])
    rec.close("halo/from_next/fwd", ys, shard(y, 1, r, P))
    rec.close("halo/from_next/dx", gx, shard(gx_ref, 1, r, P))
    lab = torch.arange(T).view(1, T)
    got = C.halo_from_next(shard(lab, 1, r, P), 1, group=dist.group.WORLD)
    rec.true("halo/from_next/int", got.dtype == lab.dtype and int(got.sum()) ==
             (0 if r == P - 1 else (r + 1) * Tl), str(got))
    for shift in (2, -3):  # halo_roll: torch.roll of the global sequence, both directions
        y = torch.roll(xr, shift, 1)
        (gx_ref,) = grads((y * W).sum(), [xr])
        xs = leaf(shard(x, 1, r, P))
        s = abs(shift)
        halo = C.halo_roll(xs, s, from_next=shift < 0, group=dist.group.WORLD)
        ys = torch.cat([halo, xs[:, :Tl - s]] if shift > 0 else [xs[:, s:], halo], dim=1)
        (gx,) = grads((ys * shard(W, 1, r, P)).sum(), [xs])
        rec.close(f"halo/roll{shift}/fwd", ys, shard(y, 1, r, P))
        rec.close(f"halo/roll{shift}/dx", gx, shard(gx_ref, 1, r, P))
    y = torch.flip(xr, [1])  # flip_sequence: the mirror rank's shard, reversed
    (gx_ref,) = grads((y * W).sum(), [xr])
    xs = leaf(shard(x, 1, r, P))
    ys = C.flip_sequence(xs, dim=1, group=dist.group.WORLD)
    (gx,) = grads((ys * shard(W, 1, r, P)).sum(), [xs])
    rec.close("halo/flip/fwd", ys, shard(y, 1, r, P))
    rec.close("halo/flip/dx", gx, shard(gx_ref, 1, r, P))
    try:
        C.halo_exchange(xs, Tl + 1, group=dist.group.WORLD)
        rec.true("halo/too_wide_error", False, "no error")
    except ValueError as e:
        rec.true("halo/too_wide_error", "exceeds the local length" in str(e), str(e))


# ------------------------------------------------------------------------------- attention checks

def check_attention(rec: Recorder, r: int, P: int) -> None:
    gen = torch.Generator().manual_seed(4)
    B, Tl, D = 2, 4, 6
    T = Tl * P
    for Hq, Hkv, Dv in ((4, 4, 6), (4, 2, 5), (4, 1, 6)):
        gqa = Hkv != Hq
        q = torch.randn(B, Hq, T, D, generator=gen, dtype=DT)
        k = torch.randn(B, Hkv, T, D, generator=gen, dtype=DT)
        v = torch.randn(B, Hkv, T, Dv, generator=gen, dtype=DT)
        W = torch.randn(B, Hq, T, Dv, generator=gen, dtype=DT)
        for causal in (True, False):
            ins = [leaf(x) for x in (q, k, v)]
            o = F.scaled_dot_product_attention(*ins, is_causal=causal, enable_gqa=gqa)
            ref_grads = grads((o * W).sum(), ins)
            for strategy in C.ATTENTION_STRATEGIES:
                tag = f"attn/{strategy}/{'causal' if causal else 'full'}/Hq{Hq}Hkv{Hkv}"
                mine = [leaf(shard(x, 2, r, P)) for x in (q, k, v)]
                with C.count_traffic() as t:
                    os_ = C.sp_attention(*mine, causal=causal, strategy=strategy,
                                         group=dist.group.WORLD, enable_gqa=gqa)
                    gs = grads((os_ * shard(W, 2, r, P)).sum(), mine)
                rec.close(tag + "/o", os_, shard(o, 2, r, P))
                for nm, got, want in zip("qkv", gs, ref_grads):
                    rec.close(f"{tag}/d{nm}", got, shard(want, 2, r, P))
                # bytes of forward + backward vs the formulas (float64: 8 bytes)
                nk, nv = mine[1].numel() * 8, mine[2].numel() * 8
                if strategy == "kv_allgather":   # all_gather K,V; reduce_scatter dK,dV
                    want = 2 * (P - 1) * (nk + nv)
                elif strategy == "ring_attention":  # K,V: P-1 hops fwd and bwd; dK,dV: P hops
                    want = 2 * (P - 1) * (nk + nv) + P * (nk + nv)
                else:  # 4 all_to_alls each way (q, k, v → heads; o → sequence), K/V replicated
                    rep = 1 if Hkv % P == 0 else next(f for f in range(1, Hq // Hkv + 1)
                                                      if (Hkv * f) % P == 0)
                    n = mine[0].numel() * 8 + rep * (nk + nv) + os_.numel() * 8
                    want = 2 * ((P - 1) * n // P)
                got = t.by_strategy.get(strategy, (0, 0))
                rec.true(tag + "/traffic", got == (want, want), f"got {got} want {want}")
    # ulysses needs Hq % P == 0: a clear error otherwise
    q = torch.randn(1, P + 1, Tl, D, dtype=DT)
    try:
        C.sp_attention(q, q, q, causal=True, strategy="ulysses", group=dist.group.WORLD)
        rec.true("attn/ulysses_heads_error", False, "no error")
    except ValueError as e:
        rec.true("attn/ulysses_heads_error", "not divisible" in str(e), str(e))


# ------------------------------------------------------------------------------ reduction checks

def check_reductions(rec: Recorder, r: int, P: int) -> None:
    gen = torch.Generator().manual_seed(5)
    xs = torch.randn(P, 3, 4, generator=gen, dtype=DT)
    xs[:, 0, 0] = 7.0                    # a tie on every rank
    xs[P - 1, 1, 1] = 9.0                # a max held by one rank
    W = torch.randn(3, 4, generator=gen, dtype=DT)
    x = leaf(xs[r])
    y = C.all_reduce_sum(x, dist.group.WORLD)
    (gx,) = grads((y * W).sum(), [x])
    rec.close("reduce/all_reduce_sum/fwd", y, xs.sum(0))
    rec.close("reduce/all_reduce_sum/dx_identity", gx, W)
    ref_in = leaf(xs)
    ref = ref_in.amax(0)
    (g_ref,) = grads((ref * W).sum(), [ref_in])
    x = leaf(xs[r])
    y = C.all_reduce_max(x, dist.group.WORLD)
    (gx,) = grads((y * W).sum(), [x])
    rec.close("reduce/all_reduce_max/fwd", y, ref)
    rec.close("reduce/all_reduce_max/dx", gx, g_ref[r])
    # gather (replicated gradient → slice)
    B, Tl, Cc = 2, 3, 4
    full = torch.randn(B, Tl * P, Cc, generator=gen, dtype=DT)
    Wf = torch.randn(B, Tl * P, Cc, generator=gen, dtype=DT)
    x = leaf(shard(full, 1, r, P))
    with C.count_traffic() as t:
        y = C.gather_sequence(x, 1, dist.group.WORLD)
    (gx,) = grads((y * Wf).sum(), [x])
    rec.close("reduce/gather_sequence/fwd", y, full)
    rec.close("reduce/gather_sequence/dx_slice", gx, shard(Wf, 1, r, P))
    nb = x.numel() * 8
    rec.true("reduce/gather_sequence/traffic", t.by_strategy["gather_sequence"] ==
             ((P - 1) * nb, (P - 1) * nb), str(t.by_strategy))
    # fallback pattern: gather (reduce_scatter grad) → sequence op → re-shard
    xr = leaf(full)
    (g_ref,) = grads((xr.cumsum(1) * Wf).sum(), [xr])
    x = leaf(shard(full, 1, r, P))
    z = C.shard_sequence(C.gather_sequence(x, 1, dist.group.WORLD, grad="reduce_scatter")
                         .cumsum(1), 1, dist.group.WORLD)
    (gx,) = grads((z * shard(Wf, 1, r, P)).sum(), [x])
    rec.close("reduce/gather_op_reshard/fwd", z, shard(full.cumsum(1), 1, r, P))
    rec.close("reduce/gather_op_reshard/dx", gx, shard(g_ref, 1, r, P))
    try:
        C.shard_sequence(torch.zeros(2, P * 3 + 1), 1, dist.group.WORLD)
        rec.true("reduce/shard_sequence_error", False, "no error")
    except ValueError as e:
        rec.true("reduce/shard_sequence_error", "not divisible" in str(e), str(e))
    # sync_gradients: grads become the sum over ranks
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2).double()
    per_rank = [[torch.full_like(p, float(j + 1) * (i + 1)) for i, p in enumerate(m.parameters())]
                for j in range(P)]
    for p, g in zip(m.parameters(), per_rank[r]):
        p.grad = g.clone()
    C.sync_gradients(m, dist.group.WORLD)
    for i, p in enumerate(m.parameters()):
        rec.close(f"reduce/sync_gradients/{i}", p.grad, sum(pr[i] for pr in per_rank))


# ------------------------------------------------------------------ input validation and timeouts

def check_validation(rec: Recorder, r: int, P: int) -> None:
    H, K, V = 2, 4, 3
    Tl = 6 if r == 0 else 4
    q = torch.randn(1, Tl, H, K, dtype=DT)
    try:
        C.sp_linear_scan(q, q, q[..., :V], group=dist.group.WORLD)
        rec.true("validate/uneven_shards", False, "no error")
    except ValueError as e:
        rec.true("validate/uneven_shards", "local length T differs" in str(e), str(e))
    s = torch.randn(1, H, K, V, dtype=DT if r == 0 else torch.float32)
    for strategy in C.STRATEGIES:
        try:
            C.exclusive_state_scan(s, None, strategy=strategy, group=dist.group.WORLD)
            rec.true(f"validate/dtype/{strategy}", False, "no error")
        except ValueError as e:
            rec.true(f"validate/dtype/{strategy}", "dtype differs" in str(e), str(e))


def check_timeout(rec: Recorder, r: int, P: int) -> None:
    """A peer that never arrives: the others fail with CollectiveError within the timeout."""
    limit = 1.0
    g_ag = dist.new_group(list(range(P)), backend="gloo")
    g_chain = dist.new_group(list(range(P)), backend="gloo")
    C.set_timeout(limit)
    try:
        for strategy, grp, absent in (("allgather", g_ag, 1), ("allscan", g_chain, 0)):
            if strategy == "allscan":
                C.set_validation(False)  # exercise the point-to-point waits themselves
            if r == absent:
                try:
                    raise RuntimeError("simulated user error on this rank")
                except RuntimeError:
                    time.sleep(3 * limit + 1.0)  # alive but never joins the collective
                continue
            t0 = time.time()
            try:
                C.exclusive_state_scan(torch.ones(1, 2, 4, 3), None, strategy=strategy,
                                       group=grp)
                rec.true(f"timeout/{strategy}/raised", False, "no error")
            except C.CollectiveError as e:
                dt = time.time() - t0
                msg = str(e)
                ok = (f"rank {r} of {P}" in msg and "exclusive_state_scan" in msg and
                      "timeout" in msg and "set_timeout" in msg)
                rec.true(f"timeout/{strategy}/message", ok, msg)
                # chain ranks further down wait for their predecessor's timeout first
                rec.true(f"timeout/{strategy}/within_limit", dt < (P + 1) * limit + 2.0,
                         f"took {dt:.2f} s")
    finally:
        C.set_timeout(None)
        C.set_validation(None)


def check_compile(rec: Recorder, r: int, P: int) -> None:
    """sp_linear_scan under torch.compile(backend="aot_eager") gives eager's numbers (fwd+bwd)."""
    if P != 2:  # one world size is enough; compiling costs seconds per process
        return
    name = dist.group.WORLD.group_name
    gen = torch.Generator().manual_seed(6)
    B, Tl, H, K, V = 1, 8, 2, 4, 3
    q, k, v = (torch.randn(B, Tl * P, H, d, generator=gen) for d in (K, K, V))
    g = -torch.rand(B, Tl * P, H, generator=gen)
    W = torch.randn(B, Tl * P, H, V, generator=gen)
    mine = [shard(x, 1, r, P) for x in (q, k, v, g)]

    def f(q, k, v, g):
        o, s = C.sp_linear_scan(q, k, v, g, output_final_state=True, chunk_size=4,
                                strategy="allscan", group=name)
        return (o * shard(W, 1, r, P)).sum() + s.sum()

    def run(fn):
        ins = [leaf(x) for x in mine]
        loss = fn(*ins)
        return [loss] + grads(loss, ins)

    eager = run(f)
    # inductor compiles C++ for a minute on 2 cores: only with SPCOMPILE_SLOW_TESTS=1
    backends = ["aot_eager"] + (["inductor"] if os.environ.get("SPCOMPILE_SLOW_TESTS") else [])
    for backend in backends:
        torch._dynamo.reset()
        got = run(torch.compile(f, backend=backend, fullgraph=True))
        for nm, a, b in zip(("loss", "dq", "dk", "dv", "dlog_decay"), got, eager):
            rec.close(f"compile/{backend}/{nm}", a, b, tol=1e-5)


def check_opcheck(rec: Recorder, r: int, P: int) -> None:
    """torch.library.opcheck (schema, autograd registration, fake, AOT dispatch) on real gloo."""
    if P != 2:
        return
    from torch.library import opcheck
    from spcompile.collectives import attention, halo, reduce, sp_scan, state_scan
    name = dist.group.WORLD.group_name
    gen = torch.Generator().manual_seed(7 + r)

    def rn(*shape, grad=True):
        return torch.randn(*shape, generator=gen, dtype=DT).requires_grad_(grad)

    q, k, v = rn(1, 8, 2, 4), rn(1, 8, 2, 4), rn(1, 8, 2, 3)
    cases = {
        "exclusive_state_scan": (state_scan._exclusive_state_scan,
                                 (rn(1, 2, 4, 3), -rn(1, 2, 4).abs(), name, "allscan", 2)),
        "sp_scan_overlap": (sp_scan._sp_scan_overlap,
                            (q, k, v, -rn(1, 8, 2).abs(), None, rn(1, 2, 4, 3), -rn(1, 2).abs(),
                             0.5, 4, name, "allgather", 1)),
        "halo_exchange": (halo._halo_exchange, (rn(2, 5, 3), 2, 1, name)),
        "halo_from_next": (halo._halo_from_next, (rn(2, 5, 3), 2, 1, name)),
        "halo_roll": (halo._halo_roll, (rn(2, 5, 3), 2, 1, True, name)),
        "flip_sequence": (halo._flip_sequence, (rn(2, 5, 3), 1, name)),
        "all_reduce": (reduce._all_reduce, (rn(3, 4), name, "max")),
        "gather_sequence_rs": (reduce._gather_sequence_rs, (rn(2, 5, 3), 1, name, "g")),
        "seq_to_heads": (attention._seq_to_heads, (rn(1, 4, 3, 5), name)),
        "ring_attention": (attention._ring_attention,
                           (rn(1, 4, 3, 5), rn(1, 2, 3, 5), rn(1, 2, 3, 5), True, 0.5, name)),
    }
    for nm, (op, args) in cases.items():
        try:
            res = opcheck(op, args)
            rec.true(f"opcheck/{nm}", all(v == "SUCCESS" for v in res.values()), str(res))
        except Exception as e:  # noqa: BLE001 - a failed utility is a failed record
            rec.true(f"opcheck/{nm}", False, str(e)[-1500:])


CHECKS: Dict[str, Callable] = {
    "state_scan": check_state_scan,
    "sp_linear_scan": check_sp_linear_scan,
    "halo": check_halo,
    "attention": check_attention,
    "reductions": check_reductions,
    "validation": check_validation,
    "compile": check_compile,
    "opcheck": check_opcheck,
    "timeout": check_timeout,   # last: it leaves two broken groups behind
}


def _entry(rank: int, world: int, port: int, outdir: str, names: List[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    rec = Recorder()
    timings = {}
    for name in names:
        t0 = time.time()
        try:
            CHECKS[name](rec, rank, world)
        except Exception:  # noqa: BLE001 - reported as a failed record
            rec.true(f"{name}/raised", False, traceback.format_exc()[-3000:])
        timings[name] = time.time() - t0
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(dict(records=rec.records, timings=timings), f)
    sys.stdout.flush()
    os._exit(0)  # skip gloo teardown (a group whose peer timed out can block in its destructor)


def run(world: int, outdir: str, names: List[str]) -> List[Dict]:
    import torch.multiprocessing as mp
    mp.spawn(_entry, args=(world, free_port(), outdir, names), nprocs=world, join=True)
    out = []
    for r in range(world):
        with open(os.path.join(outdir, f"rank{r}.json")) as f:
            d = json.load(f)
        for rec in d["records"]:
            rec["rank"] = r
        out.append(d)
    return out


if __name__ == "__main__":  # python tests/_dist_collectives.py P [check ...]
    import tempfile
    P = int(sys.argv[1])
    names = sys.argv[2:] or list(CHECKS)
    with tempfile.TemporaryDirectory() as d:
        res = run(P, d, names)
    bad = 0
    for r, d in enumerate(res):
        print(f"rank {r} timings: { {k: round(v, 2) for k, v in d['timings'].items()} }")
        for rec in d["records"]:
            if not rec["ok"]:
                bad += 1
                print("FAIL", r, rec["name"], rec["err"], rec["info"][-2000:])
    worst = max((rec["err"] for d in res for rec in d["records"]), default=0)
    print(f"{sum(len(d['records']) for d in res)} records, {bad} failed, worst err {worst:.3g}")
