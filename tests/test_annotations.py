"""Annotations: declared scans (forward/backward vs the user's own function), verification,
exclusion, the compiled graph at P = 1, and sharded runs on 2 gloo ranks (one spawn)."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F

import spcompile
from spcompile.annotations import DeclarationError, is_excluded


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ---------------------------------------------------------------- user functions, as users write them
def gla_recurrent(q, k, v, g):
    """GLA in its recurrent form, [B, H, T, D], vector log gates g [B, H, T, K]."""
    B, H, T, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for t in range(T):
        S = S * g[:, :, t, :, None].exp() + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outs, dim=2)


def masked_decay(q, k, v, g):
    """[B, T, H, D] with a data-dependent scalar log decay g [B, T, H] (simple GLA), scaled."""
    c = g.cumsum(1).transpose(1, 2)  # [B, H, T]
    T = q.shape[1]
    seg = (c[..., :, None] - c[..., None, :]).masked_fill(
        ~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    a = torch.einsum("bthk,bshk->bhts", q, k) * seg.exp() * q.shape[-1] ** -0.5
    return torch.einsum("bhts,bshv->bthv", a, v)


def retnet_fixed(q, k, v, log_gamma):
    T = q.shape[1]
    i = torch.arange(T)
    dist = (i[:, None] - i[None, :]).clamp(min=0).to(q.dtype)
    mask = torch.exp(dist * log_gamma[:, None, None]) * torch.ones(T, T).tril()  # [H, T, T]
    a = torch.einsum("bthk,bshk->bhts", q, k) * mask
    return torch.einsum("bhts,bshv->bthv", a, v)


def plain_causal(q, k, v):
    T = q.shape[1]
    a = torch.einsum("bthk,bshk->bhts", q, k) * torch.ones(T, T).tril()
    return torch.einsum("bhts,bshv->bthv", a, v)


def ssd_quadratic(C, B, x, A_dt):
    """Mamba2 SSD, quadratic form: y = (C Bᵀ ⊙ exp(segsum(A·dt))) x."""
    cs = A_dt.cumsum(1).transpose(1, 2)  # [b, h, t]
    T = C.shape[1]
    L = (cs[..., :, None] - cs[..., None, :]).masked_fill(
        ~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).exp()
    return torch.einsum("bthn,bshn,bhts,bshp->bthp", C, B, L, x)


def noncausal(q, k, v):
    return torch.einsum("bthk,bhkv->bthv", q, torch.einsum("bshk,bshv->bhkv", k, v))


CASES = {
    "none": (dict(q="q", k="k", v="v", scale=1.0), plain_causal, "bthd", None),
    "head": (dict(q="q", k="k", v="v", decay="log_gamma", decay_kind="head", scale=1.0),
             retnet_fixed, "bthd", "head"),
    "scalar": (dict(q="q", k="k", v="v", decay="g", decay_kind="scalar"), masked_decay, "bthd",
               "scalar"),
    "vector": (dict(q="q", k="k", v="v", decay="g", layout="bhtd", scale=1.0), gla_recurrent,
               "bhtd", "vector"),
}


def make_inputs(layout, decay, B=2, T=20, H=3, K=6, V=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shp = (B, T, H) if layout == "bthd" else (B, H, T)
    q = torch.randn(*shp, K, generator=gen, dtype=torch.float64)
    k = torch.randn(*shp, K, generator=gen, dtype=torch.float64)
    v = torch.randn(*shp, V, generator=gen, dtype=torch.float64)
    g = None
    if decay == "head":
        g = -torch.rand(H, generator=gen, dtype=torch.float64) * 0.5
    elif decay == "scalar":
        g = -torch.rand(*shp, generator=gen, dtype=torch.float64) * 0.5
    elif decay == "vector":
        g = -torch.rand(*shp, K, generator=gen, dtype=torch.float64) * 0.5
    return [x for x in (q, k, v, g) if x is not None]


@pytest.mark.parametrize("case", list(CASES))
def test_declared_forward_backward(case):
    kw, fn, layout, decay = CASES[case]
    declared = spcompile.linear_attention(**kw)(fn)
    xs = [x.requires_grad_() for x in make_inputs(layout, decay)]
    want = fn(*xs)
    got = declared(*xs)
    assert rel(got, want) < 1e-10, f"{case}: forward rel err {rel(got, want):.2e}"
    go = torch.randn_like(want)
    gw = torch.autograd.grad(want, xs, go)
    gg = torch.autograd.grad(got, xs, go)
    worst = max(rel(a, b) for a, b in zip(gg, gw))
    print(f"{case}: forward {rel(got, want):.1e}, worst grad {worst:.1e}")
    assert worst < 1e-9, f"{case}: backward rel err {worst:.2e}"


def test_ssm_scan_forward_backward():
    declared = spcompile.ssm_scan(C="C", B="B", x="x", log_decay="A_dt")(ssd_quadratic)
    C, B_, x, a = (t.requires_grad_() for t in make_inputs("bthd", "scalar", K=4, V=7))
    want, got = ssd_quadratic(C, B_, x, a), declared(C, B_, x, a)
    assert rel(got, want) < 1e-10
    go = torch.randn_like(want)
    for gw, gg in zip(torch.autograd.grad(want, (C, B_, x, a), go),
                      torch.autograd.grad(got, (C, B_, x, a), go)):
        assert rel(gg, gw) < 1e-9


def test_noncausal_forward_backward():
    declared = spcompile.linear_attention(causal=False, scale=1.0)(noncausal)
    xs = [t.requires_grad_() for t in make_inputs("bthd", None)]
    want, got = noncausal(*xs), declared(*xs)
    assert rel(got, want) < 1e-12
    go = torch.randn_like(want)
    for gw, gg in zip(torch.autograd.grad(want, xs, go), torch.autograd.grad(got, xs, go)):
        assert rel(gg, gw) < 1e-12


def test_decorated_function_does_not_run_the_body():
    calls = []

    @spcompile.linear_attention(scale=1.0)
    def f(q, k, v):
        calls.append(1)
        return plain_causal(q, k, v)

    f(*make_inputs("bthd", None))
    assert calls == []  # the marker op (the kernel) ran instead
    f.verify(*make_inputs("bthd", None))
    assert calls == [1]


# ---------------------------------------------------------------- verification
def test_verify_catches_a_wrong_scale():
    f = spcompile.linear_attention(q="q", k="k", v="v")(plain_causal)  # scale defaults to K^-0.5
    with pytest.raises(DeclarationError, match=r"constant factor .*declare scale=1"):
        f.verify(*make_inputs("bthd", None))


def test_verify_catches_a_missing_decay():
    # retnet_fixed decays, but the declaration says no decay (and the decay arg is ignored)
    f = spcompile.linear_attention(scale=1.0, verify=True)(retnet_fixed)
    q, k, v, lg = make_inputs("bthd", "head")
    with pytest.raises(DeclarationError, match="declare decay="):
        f(q, k, v, lg)


def test_verify_catches_swapped_roles_and_noncausal():
    f = spcompile.linear_attention(q="k", k="q", scale=1.0, verify=True)(plain_causal)
    with pytest.raises(DeclarationError, match="does not match"):
        f(*make_inputs("bthd", None))
    g = spcompile.linear_attention(scale=1.0, verify=True)(noncausal)
    with pytest.raises(DeclarationError, match="not be causal"):
        g(*make_inputs("bthd", None))


def test_verify_passes_a_right_declaration_once():
    f = spcompile.linear_attention(q="q", k="k", v="v", decay="g", layout="bhtd", scale=1.0,
                                   verify=True)(gla_recurrent)
    d = f.__spcompile_declaration__
    f(*make_inputs("bhtd", "vector"))
    assert d.verified


def test_verify_runs_at_compile_time():
    """Compiled first (no eager call): the declared pattern verifies before rewriting."""
    wrong = spcompile.linear_attention(verify=True)(plain_causal)  # scale should be 1.0

    def model(x):
        q = x.view(2, 16, 2, 4)
        return wrong(q, q * 0.5 + 0.1, q)

    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"does not match the function.*declare scale=1"):
        torch.compile(model, backend=spcompile.backend())(torch.randn(2, 16, 8))
    right = spcompile.linear_attention(scale=1.0, verify=True)(plain_causal)
    torch._dynamo.reset()
    torch.compile(lambda x: right(x, x, x), backend=spcompile.backend())(torch.randn(2, 8, 2, 4))
    assert right.__spcompile_declaration__.verified


def test_declaration_errors_are_clear():
    with pytest.raises(DeclarationError, match="not an argument"):
        spcompile.linear_attention(q="query")(plain_causal)
    with pytest.raises(DeclarationError, match="LOG decay"):
        spcompile.linear_attention(decay="scalar")(plain_causal)
    with pytest.raises(DeclarationError, match="layout"):
        spcompile.linear_attention(layout="tbhd")(plain_causal)
    f = spcompile.linear_attention(decay="g", decay_kind="vector")(masked_decay)
    with pytest.raises(DeclarationError, match="scalar decay"):
        f(*make_inputs("bthd", "scalar"))
    f = spcompile.linear_attention(layout="bhtd")(plain_causal)
    q, k, v = make_inputs("bthd", None, T=20, H=3, K=6, V=5)
    with pytest.raises(DeclarationError, match="do not fit a linear scan"):
        f(q, k, v[:, :, :2])


# ---------------------------------------------------------------- models using declarations
@spcompile.linear_attention(q="q", k="k", v="v", decay="g", layout="bhtd", scale=1.0)
def gla_declared(q, k, v, g):
    return gla_recurrent(q, k, v, g)


@spcompile.ssm_scan(C="C", B="B", x="x", log_decay="A_dt", verify=True)
def ssd_declared(C, B, x, A_dt):
    return ssd_quadratic(C, B, x, A_dt)


@spcompile.linear_attention(causal=False, scale=1.0)
def global_declared(q, k, v):
    return noncausal(q, k, v)


class GLALayer(nn.Module):
    """GLA with vector gates (Yang et al. 2024): gates from a low-rank projection, logsigmoid/16."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.h, self.dk = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.gk = nn.Sequential(nn.Linear(d, 4, bias=False), nn.Linear(4, d))
        self.o = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        g = F.logsigmoid(self.gk(x)) / 16
        q, k, v, g = (t.view(B, T, self.h, self.dk).transpose(1, 2) for t in (q, k, v, g))
        o = gla_declared(q * self.dk ** -0.5, k, v, g)
        return self.o(o.transpose(1, 2).reshape(B, T, D))


class SSDLayer(nn.Module):
    def __init__(self, d=16, heads=2, n=4):
        super().__init__()
        self.h, self.n, self.p = heads, n, d // heads
        self.in_proj = nn.Linear(d, d + 2 * heads * n + heads)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1, 4, heads)))
        self.out = nn.Linear(d, d)

    def forward(self, u):
        Bb, T, D = u.shape
        x, C, B, dt = self.in_proj(u).split([D, self.h * self.n, self.h * self.n, self.h], -1)
        dt = F.softplus(dt)  # [B, T, H]
        A = -torch.exp(self.A_log)  # [H]
        x = x.view(Bb, T, self.h, self.p) * dt[..., None]
        y = ssd_declared(C.view(Bb, T, self.h, self.n), B.view(Bb, T, self.h, self.n), x, A * dt)
        return self.out(y.reshape(Bb, T, D))


class GlobalLayer(nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (F.elu(t) + 1 if i < 2 else t for i, t in
                   enumerate(self.qkv(x).view(B, T, 3, self.h, D // self.h).unbind(2)))
        return x + global_declared(q, k, v * 0.05).reshape(B, T, D)


MODELS = {"gla_vector": GLALayer, "ssd": SSDLayer, "noncausal": GlobalLayer}


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_p1_equals_eager_and_matches(name):
    torch.manual_seed(0)
    m = MODELS[name]()
    x = torch.randn(2, 24, 16)
    torch._dynamo.reset()
    be = spcompile.backend()
    out = torch.compile(m, backend=be)(x)
    assert rel(out, m(x)) < 1e-5
    pats = [r.pattern for rep in be.reports for r in rep.matches]
    assert pats == ["declared_scan"], pats


def test_explain_names_the_users_line():
    torch.manual_seed(0)
    rep = spcompile.explain(GLALayer(), torch.randn(2, 16, 16), world_size=2, strategy="allscan")
    (row,) = rep.matches
    assert row.pattern == "declared_scan" and row.strategy == "allscan"
    assert row.source.startswith("test_annotations.py") and "gla_declared(" in row.source
    assert not rep.fallbacks


# ---------------------------------------------------------------- exclude
@spcompile.exclude
def excluded_attention(q, k, v):
    T = q.shape[-2]
    return ((q @ k.transpose(-1, -2)) * torch.ones(T, T).tril()) @ v


class ExcludedModel(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, -1)
        return x + excluded_attention(F.elu(q) + 1, F.elu(k) + 1, v).squeeze(1)


def test_exclude_marks_the_functions_nodes():
    graphs = []

    def grab(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(ExcludedModel(), backend=grab)(torch.randn(1, 8, 16))
    (gm,) = graphs
    names = {n.name: is_excluded(n) for n in gm.graph.nodes if n.op == "call_function"}
    inside = [n for n, e in names.items() if e == "excluded_attention"]
    outside = [n for n, e in names.items() if e is None]
    assert any("matmul" in n for n in inside), names
    assert any("linear" in n for n in outside), names  # the model's own ops are not excluded
    with pytest.raises(DeclarationError, match="source"):
        spcompile.exclude(len)


@spcompile.exclude
def excluded_prefix(x):
    return torch.cumsum(x, dim=1)


class PrefixModel(nn.Module):
    def __init__(self, d=16, exclude=True):
        super().__init__()
        self.lin, self.exclude = nn.Linear(d, d), exclude

    def forward(self, x):
        h = self.lin(x)
        return excluded_prefix(h) if self.exclude else torch.cumsum(h, dim=1)


def test_exclude_keeps_patterns_away():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    rep = spcompile.explain(PrefixModel(exclude=False), x, world_size=2)
    assert [m.pattern for m in rep.matches] == ["cumsum"] and not rep.fallbacks
    with pytest.warns(UserWarning, match="gathered sequence"):
        rep = spcompile.explain(PrefixModel(exclude=True), x, world_size=2)
    assert not rep.matches and len(rep.fallbacks) == 1
    assert any("excluded function excluded_prefix" in nm.reason for nm in rep.near_misses)
    # an excluded T×T form is recomputed from the gathered sequence: a fallback that names
    # the line
    with pytest.warns(UserWarning, match=r"test_annotations.py:\d+ .*gathered sequence"):
        rep = spcompile.explain(ExcludedModel(), torch.randn(2, 8, 16), world_size=2)
    assert not rep.matches and rep.fallbacks


# ---------------------------------------------------------------- sharded, 2 gloo ranks (worker side)
def check_declared_sharded(rank, P, rec):
    from _checks_backend import compare_sharded
    # one compile per model (each costs seconds); the strategies themselves are tested with the
    # collectives, here each model gets a different one
    for (name, cls), strategy in zip(MODELS.items(), ("allscan", "ring", "auto")):
        if True:
            be = compare_sharded(rank, P, rec, f"declared {name}/{strategy}", cls, T=32,
                                 strategy=strategy)
            rows = [m for r in be.reports for m in r.matches]
            rec.true(f"declared {name}/{strategy}: one declared match, no fallback",
                     [m.pattern for m in rows] == ["declared_scan"]
                     and not any(r.fallbacks for r in be.reports),
                     str([(m.pattern, m.strategy) for m in rows]))


def test_declared_sharded_on_2_ranks():
    from dist_harness import assert_rows, run_checks
    assert_rows(run_checks("test_annotations", ["check_declared_sharded"], 2))
