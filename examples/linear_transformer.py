"""Linear transformer (Katharopoulos et al., 2020, "Transformers are RNNs"), causal, masked form.

Feature map φ(x) = elu(x) + 1; the numerator is the paper's quadratic form with a
lower-triangular mask (its Eq. 9 with causal masking), the normaliser its Eq. 20, φ(Q_i)·Σ_{j<=i} φ(K_j):

    out_i = [(φ(Q) φ(K)ᵀ ⊙ M) V]_i / (φ(Q_i) · cumsum(φ(K))_i + eps)

spcompile finds a causal scan (numerator) and a cumsum along the sequence (normaliser) and
shards both: a scan hand-off and a prefix sum of per-rank totals.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalLinearAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, eps: float = 1e-6):
        super().__init__()
        self.h, self.eps = n_heads, eps
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x):
        B, T, D = x.shape
        q = self.query(x).view(B, T, self.h, -1).transpose(1, 2)  # [B, H, T, d]
        k = self.key(x).view(B, T, self.h, -1).transpose(1, 2)
        v = self.value(x).view(B, T, self.h, -1).transpose(1, 2)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        mask = torch.tril(torch.ones(T, T, device=x.device))
        A = torch.matmul(q, k.transpose(-2, -1)) * mask  # [B, H, T, T]
        num = torch.matmul(A, v)
        den = torch.einsum("bhtd,bhtd->bht", q, k.cumsum(dim=2)) + self.eps
        o = (num / den[..., None]).transpose(1, 2).reshape(B, T, D)
        return self.out(o)


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalLinearAttention(d_model, n_heads)
        self.ff = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.ff(self.ln2(x))


class LinearTransformer(nn.Module):
    def __init__(self, d_model: int = 32, n_heads: int = 4, n_layers: int = 2):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(d_model, n_heads) for _ in range(n_layers)])

    def forward(self, x):
        return self.blocks(x)


# torch 2.13's AOTAutograd fails on this model even without spcompile: elu_backward's meta
# function predicts other strides than the CPU kernel returns when the gradient's layout differs
# from its input's, and a later view breaks. The eager delegate sidesteps it.
COMPILE_OPTIONS = {"compiler": "eager"}


def factory():
    torch.manual_seed(0)
    return LinearTransformer(), (torch.randn(2, 64, 32),)


if __name__ == "__main__":
    from _common import run_example
    run_example(factory, **COMPILE_OPTIONS)
