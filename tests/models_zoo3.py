"""Associative scans along the sequence as recurrent-model code writes them (plain PyTorch, nothing
from spcompile): minGRU / minLSTM in log space (Heinsen scan), a Mamba-1 selective scan in its
parallel cumsum form, cumprod decays and running max/min features.

Every model takes ``x: [B, T, D]`` (float) unless it says otherwise.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------- 1. minGRU / minLSTM
# "Were RNNs All We Needed?" (Feng et al. 2024), appendix code: g / log_g keep h positive so the
# recurrence h_t = a_t h_{t-1} + b_t can run in log space.
def g(x):
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x):
    return torch.where(x >= 0, (F.relu(x) + 0.5).log(), -F.softplus(-x))


def parallel_scan_log(log_coeffs, log_values):
    """The paper's form: log_coeffs [B, T, D], log_values [B, T + 1, D] (h0 in row 0)."""
    a_star = F.pad(torch.cumsum(log_coeffs, dim=1), (0, 0, 1, 0))
    log_h0_plus_b_star = torch.logcumsumexp(log_values - a_star, dim=1)
    log_h = a_star + log_h0_plus_b_star
    return torch.exp(log_h)[:, 1:]


def heinsen_scan_log(log_coeffs, log_values):
    """The same scan from h0 = 0 (no leading row): both [B, T, D]."""
    a_star = log_coeffs.cumsum(dim=1)
    log_h0_plus_b_star = (log_values - a_star).logcumsumexp(dim=1)
    log_h = a_star + log_h0_plus_b_star
    return log_h.exp()


class MinGRU(nn.Module):
    """``form="paper"``: ``forward(x, h_0)`` with ``h_0: [B, 1, H]`` concatenated in front of the
    values and dropped by ``[:, 1:]``; ``form="heinsen"``: ``forward(x)`` from h0 = 0."""

    def __init__(self, d: int = 16, hidden: int = 16, form: str = "paper"):
        super().__init__()
        self.form = form
        self.linear_z = nn.Linear(d, hidden)
        self.linear_h = nn.Linear(d, hidden)

    def forward(self, x, h_0=None):
        k = self.linear_z(x)
        log_z = -F.softplus(-k)
        log_coeffs = -F.softplus(k)
        log_tilde_h = log_g(self.linear_h(x))
        if self.form == "paper":
            log_h_0 = log_g(h_0)
            return parallel_scan_log(log_coeffs, torch.cat([log_h_0, log_z + log_tilde_h], dim=1))
        return heinsen_scan_log(log_coeffs, log_z + log_tilde_h)


class MinGRULastState(MinGRU):
    """The paper's minGRU that also returns the last state read from the log-space value that
    still has the h_0 row (``log_h[:, -1]``): not the covered form (the longer value is read
    elsewhere than ``[:, 1:]``), so it is gathered."""

    def forward(self, x, h_0):
        k = self.linear_z(x)
        log_coeffs = -F.softplus(k)
        log_values = torch.cat([log_g(h_0), -F.softplus(-k) + log_g(self.linear_h(x))], dim=1)
        a_star = F.pad(torch.cumsum(log_coeffs, dim=1), (0, 0, 1, 0))
        log_h = a_star + torch.logcumsumexp(log_values - a_star, dim=1)
        return torch.exp(log_h)[:, 1:], torch.exp(log_h[:, -1])


class MinLSTM(nn.Module):
    """minLSTM with normalised gates; the paper's form with a learned h0 (expanded to the batch),
    or the h0 = 0 form."""

    def __init__(self, d: int = 16, hidden: int = 16, form: str = "paper"):
        super().__init__()
        self.form = form
        self.linear_f = nn.Linear(d, hidden)
        self.linear_i = nn.Linear(d, hidden)
        self.linear_h = nn.Linear(d, hidden)
        self.h_0 = nn.Parameter(torch.rand(1, 1, hidden))

    def forward(self, x):
        diff = F.softplus(-self.linear_f(x)) - F.softplus(-self.linear_i(x))
        log_f = -F.softplus(diff)
        log_i = -F.softplus(-diff)
        log_tilde_h = log_g(self.linear_h(x))
        if self.form == "paper":
            log_h_0 = log_g(self.h_0).expand(x.shape[0], -1, -1)
            return parallel_scan_log(log_f, torch.cat([log_h_0, log_i + log_tilde_h], dim=1))
        return heinsen_scan_log(log_f, log_i + log_tilde_h)


class MinGRULM(nn.Module):
    """Two residual blocks (RMSNorm → minGRU → out proj, RMSNorm → MLP), as the paper's LM
    stacks them; the scans of the second block see the first block's output."""

    def __init__(self, d: int = 16, form: str = "heinsen", layers: int = 2):
        super().__init__()
        self.form = form
        self.norms = nn.ModuleList([nn.RMSNorm(d) for _ in range(2 * layers)])
        self.rnns = nn.ModuleList([MinGRU(d, 2 * d, form) for _ in range(layers)])
        self.outs = nn.ModuleList([nn.Linear(2 * d, d, bias=False) for _ in range(layers)])
        self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(),
                                                 nn.Linear(2 * d, d)) for _ in range(layers)])

    def forward(self, x):
        B = x.shape[0]
        for i, (rnn, out, mlp) in enumerate(zip(self.rnns, self.outs, self.mlps)):
            h_0 = None
            if self.form == "paper":
                h_0 = torch.zeros(B, 1, out.in_features, dtype=x.dtype, device=x.device)
            x = x + out(rnn(self.norms[2 * i](x), h_0))
            x = x + mlp(self.norms[2 * i + 1](x))
        return x


# ---------------------------------------------------------------- 2. Mamba-1, parallel form
class Mamba1CumsumScan(nn.Module):
    """Selective scan h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t, y_t = C_t h_t + D x_t, written in
    parallel form: ``A_cum = cumsum(Δ A)``, ``h = exp(A_cum) * cumsum(exp(-A_cum) * ΔBu)``."""

    def __init__(self, d: int = 16, d_state: int = 4, expand: int = 2):
        super().__init__()
        di = expand * d
        self.d_state = d_state
        self.in_proj = nn.Linear(d, 2 * di, bias=False)
        self.x_proj = nn.Linear(di, 1 + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(1, di)
        with torch.no_grad():  # Mamba's Δ init: softplus(bias) log-uniform in [1e-3, 1e-1]
            dt = torch.exp(torch.rand(di) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(di, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d, bias=False)

    def forward(self, x):
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(u)
        dt, B, C = torch.split(self.x_proj(u), [1, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))                        # [b, l, d]
        A = -torch.exp(self.A_log.float())                          # [d, n]
        deltaA = torch.einsum("bld,dn->bldn", delta, A)
        deltaB_u = torch.einsum("bld,bln,bld->bldn", delta, B, u)
        A_cum = torch.cumsum(deltaA, dim=1)
        h = torch.exp(A_cum) * torch.cumsum(torch.exp(-A_cum) * deltaB_u, dim=1)
        y = torch.einsum("bldn,bln->bld", h, C) + u * self.D
        return self.out_proj(y * F.silu(z))


# ---------------------------------------------------------------- 3. cumprod decays
class CumprodDecay(nn.Module):
    """h_t = f_t h_{t-1} + (1 - f_t) v_t as ``F = cumprod(f)``, ``h = F * cumsum((1-f) v / F)``
    (the ratio form). ``spelling``: "function" (``torch.cumprod(f, dim=1)``), "method"
    (``f.cumprod(-2)``) or "dtype" (``torch.cumprod(f, 1, dtype=torch.float64)``, the ratio in
    double)."""

    def __init__(self, d: int = 16, spelling: str = "function"):
        super().__init__()
        self.spelling = spelling
        self.f = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        nn.init.constant_(self.f.bias, 2.0)  # forget-gate bias: decays near 0.9

    def forward(self, x):
        f = torch.sigmoid(self.f(x))
        v = (1 - f) * self.v(x)
        if self.spelling == "method":
            decay = f.cumprod(-2)
            h = decay * (v / decay).cumsum(-2)
        elif self.spelling == "dtype":
            decay = torch.cumprod(f, 1, dtype=torch.float64)
            h = (decay * torch.cumsum(v / decay, 1, dtype=torch.float64)).float()
        else:
            decay = torch.cumprod(f, dim=1)
            h = decay * torch.cumsum(v / decay, dim=1)
        return self.o(h), decay.float()


# ---------------------------------------------------------------- 4. running max / min
class RunningMaxFeatures(nn.Module):
    """Running max of a score, the distance since it was reached (``arange(T) - indices``) and
    a running min (``.cummin(-2).values``): values and indices both used."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.score = nn.Linear(d, d)
        self.out = nn.Linear(3 * d, d)

    def forward(self, x):
        T = x.shape[1]
        s = self.score(x)
        m, idx = torch.cummax(s, dim=1)
        age = torch.arange(T, device=x.device)[None, :, None] - idx
        low = s.cummin(-2).values
        feats = torch.cat([m, torch.exp(-age.float() / 8), low], dim=-1)
        return self.out(feats), idx


class TiedRunningMax(nn.Module):
    """cummax / cummin of ``x * scale`` where x has ties (integer-valued inputs): the gradient
    goes to the tied element torch's indices name (the last one)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        y = x * self.scale
        mx = torch.cummax(y, 1)
        mn = torch.cummin(y, dim=-2)
        return mx.values, mx.indices, mn[0], mn[1]


class LogCumSumExpPool(nn.Module):
    """Prefix softmax pooling (attention-free): out_t = Σ_{j≤t} softmax(s)_j v_j, the normaliser
    as ``exp(-logcumsumexp(s))``. (No bias on the score: the output does not depend on it.)"""

    def __init__(self, d: int = 16):
        super().__init__()
        self.s = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d)

    def forward(self, x):
        s = self.s(x)
        num = torch.cumsum(torch.exp(s) * self.v(x), dim=1)
        return num * torch.exp(-torch.logcumsumexp(s, dim=-2))
