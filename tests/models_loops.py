"""Recurrences written as Python loops over tokens or blocks (Dynamo unrolls them), as papers and
model zoos write them: HF Mamba's ``slow_forward`` selective scan, lightning-attention / RetNet
block loops, a linear transformer with a normaliser state, a learned initial state, and loops
spcompile must refuse (nonlinear recurrences, bodies that read the loop counter)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MambaSlowScan(nn.Module):
    """HF ``MambaMixer.slow_forward`` without the cache: causal depthwise conv, selective scan
    as a loop over tokens on ``[B, D, T, N]`` tensors, ``torch.stack(..., dim=-1)``."""

    def __init__(self, d: int = 16, d_inner: int = 16, n: int = 4, k: int = 4, dt_rank: int = 2):
        super().__init__()
        self.d_inner, self.n, self.dt_rank = d_inner, n, dt_rank
        self.in_proj = nn.Linear(d, 2 * d_inner)
        self.conv1d = nn.Conv1d(d_inner, d_inner, k, groups=d_inner, padding=k - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        A = torch.arange(1, n + 1, dtype=torch.float32)[None, :].expand(d_inner, -1)
        self.A_log = nn.Parameter(torch.log(A).contiguous())
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d)

    def forward(self, input_states):
        batch_size, seq_len, _ = input_states.shape
        dtype = input_states.dtype
        projected_states = self.in_proj(input_states).transpose(1, 2)
        hidden_states, gate = projected_states.chunk(2, dim=1)
        hidden_states = F.silu(self.conv1d(hidden_states)[..., :seq_len])
        ssm_parameters = self.x_proj(hidden_states.transpose(1, 2))
        time_step, B, C = torch.split(ssm_parameters, [self.dt_rank, self.n, self.n], dim=-1)
        discrete_time_step = self.dt_proj(time_step)
        discrete_time_step = F.softplus(discrete_time_step).transpose(1, 2)
        A = -torch.exp(self.A_log.float())
        discrete_A = torch.exp(A[None, :, None, :] * discrete_time_step[:, :, :, None])
        discrete_B = discrete_time_step[:, :, :, None] * B[:, None, :, :].float()
        deltaB_u = discrete_B * hidden_states[:, :, :, None].float()
        ssm_state = torch.zeros((batch_size, self.d_inner, self.n), device=input_states.device,
                                dtype=dtype)
        scan_outputs = []
        for i in range(seq_len):
            ssm_state = discrete_A[:, :, i, :] * ssm_state + deltaB_u[:, :, i, :]
            scan_output = torch.matmul(ssm_state.to(dtype), C[:, i, :].unsqueeze(-1))
            scan_outputs.append(scan_output[:, :, 0])
        scan_output = torch.stack(scan_outputs, dim=-1)
        scan_output = scan_output + (hidden_states * self.D[None, :, None])
        scan_output = scan_output * F.silu(gate)
        return self.out_proj(scan_output.transpose(1, 2))


class LightningBlockLoop(nn.Module):
    """Lightning attention-2 reference: a loop over blocks, intra-block masked decay, the
    inter-block state ``kv`` decayed by ``λ^C`` per block; heads on dim 1."""

    def __init__(self, d: int = 16, heads: int = 2, block: int = 4):
        super().__init__()
        self.h, self.dh, self.block = heads, d // heads, block
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.register_buffer("slope", torch.tensor([0.5, 0.125]).reshape(heads, 1, 1))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        C = self.block
        array = torch.arange(C, device=x.device, dtype=x.dtype) + 1
        q_decay = torch.exp(-self.slope * array.reshape(-1, 1))
        k_decay = torch.exp(-self.slope * (C - array.reshape(-1, 1)))
        index = array[:, None] - array[None, :]
        s_index = self.slope * index[None, None]
        s_index = torch.masked_fill(s_index, index < 0, float("inf"))
        diag_decay = torch.exp(-s_index)
        block_decay = torch.exp(-self.slope * C)
        kv = torch.zeros(b, self.h, self.dh, self.dh, dtype=x.dtype, device=x.device)
        output = []
        for i in range(n // C):
            s, e = i * C, (i + 1) * C
            qi, ki, vi = q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]
            qkv = (qi @ ki.transpose(-1, -2) * diag_decay) @ vi
            qkv_none_diag = (qi * q_decay) @ kv
            output.append(qkv + qkv_none_diag)
            kv = block_decay * kv + (ki * k_decay).transpose(-1, -2) @ vi
        out = torch.cat(output, dim=2)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class NormalisedTokenLoop(nn.Module):
    """Katharopoulos' recurrent form: two states (``S`` and the normaliser ``z``), elu+1
    features, ``y_t = φ(q_t) S_t / (φ(q_t)·z_t)``; outputs gathered by ``torch.cat`` of
    ``unsqueeze(1)`` pieces."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        S = x.new_zeros(x.shape[0], x.shape[-1], x.shape[-1])
        z = x.new_zeros(x.shape[0], x.shape[-1])
        ys = []
        for t in range(x.shape[1]):
            S = S + k[:, t, :, None] * v[:, t, None, :]
            z = z + k[:, t]
            num = torch.einsum("bd,bde->be", q[:, t], S)
            den = (q[:, t] * z).sum(-1, keepdim=True) + 1e-6
            ys.append((num / den).unsqueeze(1))
        return torch.cat(ys, dim=1)


class LearnedInitGatedLoop(nn.Module):
    """A gated diagonal recurrence ``h_t = a_t ⊙ h_{t-1} + (1 - a_t) ⊙ x_t`` (minimal RG-LRU /
    QRNN-style) starting from a learned ``h0`` (also used after the loop); returns the final
    state too."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.gate = nn.Linear(d, d)
        self.inp = nn.Linear(d, d)
        self.h0 = nn.Parameter(torch.randn(d) * 0.5)

    def forward(self, x):
        a = torch.sigmoid(self.gate(x))
        u = self.inp(x)
        h = self.h0.expand(x.shape[0], -1)
        hs = []
        for t in range(x.shape[1]):
            h = a[:, t] * h + (1 - a[:, t]) * u[:, t]
            hs.append(h)
        return torch.stack(hs, dim=1) + self.h0, h  # h0 also used outside the loop


class RetNetChunkLoop(nn.Module):
    """RetNet's chunkwise form as a loop over chunks with per-head decay γ, with the state
    carried across chunks (the torchscale recurrent-chunk spelling, simplified)."""

    def __init__(self, d: int = 16, heads: int = 2, chunk: int = 4):
        super().__init__()
        self.h, self.dh, self.chunk = heads, d // heads, chunk
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        gamma = 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float32))
        self.register_buffer("gamma", gamma)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, -1))
        C = self.chunk
        idx = torch.arange(C, dtype=x.dtype)
        lg = torch.log(self.gamma)[:, None]
        inner = torch.exp(lg[..., None] * (idx[:, None] - idx[None, :])) * \
            torch.ones(C, C).tril()
        q_dec = torch.exp(lg * (idx + 1))[..., None]
        k_dec = torch.exp(lg * (C - 1 - idx))[..., None]
        chunk_dec = torch.exp(lg * C)[..., None]
        state = torch.zeros(B, self.h, self.dh, self.dh)
        outs = []
        for c in range(T // C):
            qc, kc, vc = (t[:, :, c * C:(c + 1) * C] for t in (q, k, v))
            o = (qc @ kc.transpose(-1, -2) * inner) @ vc + (qc * q_dec) @ state
            state = chunk_dec * state + (kc * k_dec).transpose(-1, -2) @ vc
            outs.append(o)
        return torch.cat(outs, dim=2).transpose(1, 2).reshape(B, T, -1)


class _OneLinear(nn.Module):
    """A loop model with one token-local projection ``self.lin``."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)


# ---------------------------------------------------------------- loops spcompile must refuse
class GRULoop(nn.Module):
    """A nonlinear recurrence (GRU cell in a loop): not affine in the state → refused."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.cell = nn.GRUCell(d, d)

    def forward(self, x):
        h = torch.zeros(x.shape[0], x.shape[-1])
        hs = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            hs.append(h)
        return torch.stack(hs, 1)


class CounterLoop(_OneLinear):
    """The body reads the loop counter as a number (``γ^t`` input weights): a rank's unrolled
    loop would restart the counter at 0 → refused."""

    def forward(self, x):
        h = self.lin(x)
        s = torch.zeros_like(h[:, 0])
        outs = []
        for t in range(x.shape[1]):
            s = 0.9 * s + h[:, t] * (0.99 ** t)
            outs.append(s)
        return torch.stack(outs, dim=1)


class PartialBlockLoop(nn.Module):
    """A block loop whose blocks do not tile every rank's shard the same way → refused."""

    def __init__(self, d: int = 16, block: int = 3):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.block = block

    def forward(self, x):
        h = self.lin(x)
        T, C = x.shape[1], self.block
        s = torch.zeros(x.shape[0], x.shape[2])
        outs = []
        for i in range(math.ceil(T / C)):
            blk = h[:, i * C:(i + 1) * C]
            outs.append(blk.cumsum(1) + s[:, None])
            s = s * 0.5 + blk.sum(1)
        return torch.cat(outs, dim=1)


class UnbindLoop(_OneLinear):
    """The token loop spelled ``for h_t in h.unbind(1)``."""

    def forward(self, x):
        h = self.lin(x)
        s = torch.zeros(x.shape[0], x.shape[2])
        outs = []
        for h_t in h.unbind(1):
            s = 0.9 * s + h_t
            outs.append(s)
        return torch.stack(outs, dim=1)


class SplitBlockLoop(nn.Module):
    """A block loop spelled ``for blk in h.split(C, dim=1)`` with a decayed running sum."""

    def __init__(self, d: int = 16, block: int = 4):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.block = block

    def forward(self, x):
        h = self.lin(x)
        s = torch.zeros(x.shape[0], x.shape[2])
        outs = []
        for blk in h.split(self.block, dim=1):
            outs.append(blk.cumsum(1) + s[:, None])
            s = s * 0.5 + blk.sum(1)
        return torch.cat(outs, dim=1)


class TwoUnbindLoops(nn.Sequential):
    """Two stacked token loops (``unbind`` spelling): one unrolled loop group, two states."""

    def __init__(self, d: int = 16):
        super().__init__(UnbindLoop(d), UnbindLoop(d))


class GRUUnbindLoop(nn.Module):
    """A GRU cell over ``x.unbind(1)``: nonlinear → refused."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.cell = nn.GRUCell(d, d)

    def forward(self, x):
        h = torch.zeros(x.shape[0], x.shape[-1])
        hs = []
        for x_t in x.unbind(1):
            h = self.cell(x_t, h)
            hs.append(h)
        return torch.stack(hs, 1)


class TwoMambaSlow(nn.Sequential):
    """Two stacked HF-Mamba slow-path mixers (the second layer's conv halo and loop are found
    after the first loop's rewrite)."""

    def __init__(self, d: int = 16):
        super().__init__(MambaSlowScan(d), MambaSlowScan(d))


class PreallocLoop(_OneLinear):
    """Outputs written into a preallocated tensor, ``out[:, t] = s`` (an in-place setitem)."""

    def forward(self, x):
        h = self.lin(x)
        s = torch.zeros(x.shape[0], x.shape[2])
        out = torch.zeros_like(h)
        for t in range(x.shape[1]):
            s = 0.9 * s + h[:, t]
            out[:, t] = s
        return out


class StackDim0Loop(_OneLinear):
    """``torch.stack(ys)`` along dim 0, then ``.transpose(0, 1)`` (common RNN code)."""

    def forward(self, x):
        h = torch.sigmoid(self.lin(x))
        s = torch.zeros(x.shape[0], x.shape[2])
        ys = []
        for t in range(x.shape[1]):
            s = h[:, t] * s + (1 - h[:, t]) * x[:, t]
            ys.append(torch.tanh(s))
        return torch.stack(ys).transpose(0, 1)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None):
    """mamba_ssm's reference selective scan, ``[B, D, L]`` layout (sequence on dim 2)."""
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = A.new_zeros((u.shape[0], A.shape[0], A.shape[1]))
    ys = []
    last_state = None
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
        if i == u.shape[2] - 1:
            last_state = x
        ys.append(y)
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[:, None]
    if z is not None:
        out = out * F.silu(z)
    return out, last_state


class MambaRefScan(nn.Module):
    """A Mamba-1 mixer around ``selective_scan_ref`` (inputs ``[B, L, D]``)."""

    def __init__(self, d: int = 16, n: int = 4):
        super().__init__()
        self.in_proj = nn.Linear(d, 2 * d)
        self.x_proj = nn.Linear(d, 1 + 2 * n, bias=False)
        self.dt_proj = nn.Linear(1, d)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1.0)).repeat(d, 1))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, d)
        self.n = n

    def forward(self, h):
        xz = self.in_proj(h).transpose(1, 2)  # [B, 2D, L]
        x, z = xz.chunk(2, dim=1)
        dbc = self.x_proj(x.transpose(1, 2))  # [B, L, 1 + 2n]
        dt, Bm, Cm = torch.split(dbc, [1, self.n, self.n], dim=-1)
        delta = F.softplus(self.dt_proj(dt)).transpose(1, 2)  # [B, D, L]
        y, _ = selective_scan_ref(x, delta, -torch.exp(self.A_log), Bm.transpose(1, 2),
                                  Cm.transpose(1, 2), self.D, z)
        return self.out_proj(y.transpose(1, 2))


# ---------------------------------------------------------------- outputs written in place
class EmptyWriteLoop(_OneLinear):
    """``y = torch.empty(B, T, D)`` before the loop, ``y[:, t, :] = f(s)`` in it, a projection
    after it (minimal-mamba / simple RNN LM code)."""

    def __init__(self, d: int = 16):
        super().__init__(d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        a = torch.sigmoid(self.lin(x))
        s = torch.zeros(B, D)
        y = torch.empty(B, T, D)
        for t in range(T):
            s = a[:, t] * s + x[:, t]
            y[:, t, :] = torch.tanh(s) * x[:, t]
        return self.out(y)


class NewZerosBlockWrite(nn.Module):
    """A block loop writing ``y[:, i*C:(i+1)*C] = ...`` into ``x.new_zeros(...)``."""

    def __init__(self, d: int = 16, block: int = 4):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.block = block

    def forward(self, x):
        h = self.lin(x)
        C = self.block
        s = x.new_zeros(x.shape[0], x.shape[2])
        y = x.new_zeros(x.shape)
        for i in range(x.shape[1] // C):
            blk = h[:, i * C:(i + 1) * C]
            y[:, i * C:(i + 1) * C] = blk.cumsum(1) + s[:, None]
            s = s * 0.5 + blk.sum(1)
        return y


class ChannelFirstWriteScan(nn.Module):
    """A selective scan on ``[B, D, L]`` tensors writing ``y[:, :, t] = ...`` into
    ``torch.zeros_like(u)`` (S4/S5-style recurrent views), with ``copy_`` for half the channels'
    skip term: ``y[:, :, t].add_`` is not used, only assignment."""

    def __init__(self, d: int = 16, n: int = 4):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.dt = nn.Linear(d, d)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1.0)).repeat(d, 1))
        self.Bp = nn.Parameter(torch.randn(d, n) * 0.3)
        self.Cp = nn.Parameter(torch.randn(d, n) * 0.3)

    def forward(self, x):
        u = self.inp(x).transpose(1, 2)  # [B, D, L]
        dt = F.softplus(self.dt(x)).transpose(1, 2)
        dA = torch.exp(dt[..., None] * -torch.exp(self.A_log)[:, None])  # [B, D, L, N]
        dBu = (dt * u)[..., None] * self.Bp[:, None]
        h = u.new_zeros(u.shape[0], u.shape[1], self.A_log.shape[1])
        y = torch.zeros_like(u)
        for t in range(u.shape[2]):
            h = dA[:, :, t] * h + dBu[:, :, t]
            y[:, :, t] = (h * self.Cp).sum(-1)
        return y.transpose(1, 2)


class CopyIntoSliceLoop(_OneLinear):
    """``out[:, t].copy_(s)`` (a copy into a view of the preallocated output)."""

    def forward(self, x):
        h = self.lin(x)
        s = torch.zeros(x.shape[0], x.shape[2])
        out = torch.empty_like(h)
        for t in range(x.shape[1]):
            s = 0.9 * s + h[:, t]
            out[:, t].copy_(s * h[:, t])
        return out


# ---------------------------------------------------------------- exclusive outputs
class ExclusiveMatrixLoop(nn.Module):
    """Output read BEFORE the update (``o_t = q_t S_{t-1}``, ``S_t = γ S_{t-1} + k_tᵀ v_t``):
    the exclusive form of retention / linear attention."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        S = torch.zeros(x.shape[0], x.shape[2], x.shape[2])
        ys = []
        for t in range(x.shape[1]):
            ys.append((q[:, t, None] @ S)[:, 0])
            S = 0.9 * S + k[:, t, :, None] * v[:, t, None, :]
        return torch.stack(ys, dim=1)


class ExclusiveStateReadout(_OneLinear):
    """A readout of the state only, taken before the update (``ys.append(tanh(s))`` then
    ``s = a_t s + x_t``)."""

    def forward(self, x):
        a = torch.sigmoid(self.lin(x))
        s = torch.zeros(x.shape[0], x.shape[2])
        ys = []
        for t in range(x.shape[1]):
            ys.append(torch.tanh(s))
            s = a[:, t] * s + x[:, t]
        return torch.stack(ys, dim=1)


class BeforeAfterLoop(_OneLinear):
    """Outputs that combine the state before and after the update: a trapezoid readout
    ``0.5 (s_{t-1} + s_t)`` and ``q_t · (s_t - s_{t-1})``."""

    def forward(self, x):
        h = self.lin(x)
        s = torch.zeros(x.shape[0], x.shape[2])
        ys = []
        for t in range(x.shape[1]):
            prev = s
            s = 0.8 * s + h[:, t]
            ys.append(0.5 * (prev + s) + x[:, t] * (s - prev))
        return torch.stack(ys, dim=1)


class BeforeAfterStateOnly(_OneLinear):
    """``ys.append(s_prev + s)``: state-only readout of both states."""

    def forward(self, x):
        a = torch.sigmoid(self.lin(x))
        s = torch.zeros(x.shape[0], x.shape[2])
        ys = []
        for t in range(x.shape[1]):
            prev = s
            s = a[:, t] * s + x[:, t]
            ys.append(prev + s)
        return torch.stack(ys, dim=1)


class ExclusiveWriteLoop(nn.Module):
    """Exclusive outputs written in place: ``y[:, t] = q_t S_{t-1}`` then the update."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        S = torch.zeros(x.shape[0], x.shape[2], x.shape[2])
        y = torch.zeros_like(x)
        for t in range(x.shape[1]):
            y[:, t] = torch.einsum("bd,bde->be", q[:, t], S)
            S = 0.9 * S + torch.einsum("bd,be->bde", k[:, t], v[:, t])
        return y


class WriteIntoCloneLoop(_OneLinear):
    """Outputs written into ``h.clone()`` (not a fresh tensor): refused."""

    def forward(self, x):
        h = self.lin(x)
        s = torch.zeros(x.shape[0], x.shape[2])
        y = h.clone()
        for t in range(x.shape[1]):
            s = 0.9 * s + h[:, t]
            y[:, t] = s
        return y


class ReadBufferInLoop(_OneLinear):
    """The output buffer read inside the loop (``y[:, t] = s`` then ``y[:, t] * 2``): refused."""

    def forward(self, x):
        h = self.lin(x)
        s = torch.zeros(x.shape[0], x.shape[2])
        y = torch.zeros_like(h)
        outs = []
        for t in range(x.shape[1]):
            s = 0.9 * s + h[:, t]
            y[:, t] = s
            outs.append(y.sum(1))
        return torch.stack(outs, 1) + y


class TimeMajorWriteLoop(_OneLinear):
    """Time-major RNN code: ``outputs = torch.zeros(T, B, D)``, ``outputs[t] = h`` over
    ``x.transpose(0, 1)``, transposed back after the loop."""

    def forward(self, x):
        xs = x.transpose(0, 1)  # [T, B, D]
        a = torch.sigmoid(self.lin(xs))
        T, B, D = xs.shape
        h = torch.zeros(B, D)
        outputs = torch.zeros(T, B, D)
        for t in range(T):
            h = a[t] * h + (1 - a[t]) * xs[t]
            outputs[t] = h
        return outputs.transpose(0, 1)
