"""Linear-scan kernels: chunked reference vs the naive recurrence (fp64), Triton vs reference.

* Reference vs naive: every decay kind, with/without initial state, T in {1, 63, 64, 200},
  forward (output and final state) and every gradient (q, k, v, log_decay, initial_state, with
  a gradient flowing into the final state too), plus extreme decays (near 0 and -inf).
* Triton vs reference: the real kernels run under ``TRITON_INTERPRET=1`` on the CPU at tiny
  shapes (an interpreted launch costs ~0.1 s). The flag must be set before the kernels module is
  decorated; when another test module imported it first without the flag, these checks run in
  one subprocess instead (``python tests/test_kernels.py --triton-json``).
* ``torch.library.opcheck`` on ``spcompile::linear_scan`` (reference path).
"""
import os
import sys

_KERNELS_MOD = "spcompile.kernels.linear_scan.triton_kernels"
# Decide before anything imports triton: can the interpreted kernels run in this process?
_IN_PROCESS = _KERNELS_MOD not in sys.modules and os.environ.get("TRITON_INTERPRET", "1") == "1"
if _IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
from functools import lru_cache  # noqa: E402
from typing import Dict, Optional  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spcompile.kernels.linear_scan import linear_scan, naive_linear_scan  # noqa: E402
from spcompile.kernels.linear_scan.reference import chunked_linear_scan  # noqa: E402

KINDS = ["none", "head", "scalar", "vector"]


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """‖a - b‖ / max(‖b‖, floor) in fp64 (NaN/inf anywhere → inf)."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def make_inputs(kind: str, B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype,
                with_h0: bool, seed: int = 0, extreme: bool = False) -> Dict[str, Optional[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    if kind == "none":
        ld = None
    elif kind == "head":
        ld = -torch.rand(H, generator=g, dtype=torch.float64) * 0.3
    elif kind == "scalar":
        ld = F.logsigmoid(r(B, T, H) + 2.0)
    else:
        ld = F.logsigmoid(r(B, T, H, K) + 2.0)
    if extreme and ld is not None:
        # decays of exactly 0 (-inf), far below the clamp, and exactly 1 (log 0), mixed in
        flat = ld.view(-1)
        flat[0::5] = -math.inf
        flat[1::5] = -1e4
        flat[2::5] = 0.0
        flat[3::5] = -1e-7
    h0 = r(B, H, K, V) if with_h0 else None
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return {"q": cast(q), "k": cast(k), "v": cast(v), "log_decay": cast(ld),
            "initial_state": None if h0 is None else h0.float() if dtype != torch.float64 else h0}


def grads_of(fn, inp: Dict[str, Optional[torch.Tensor]], seed: int = 1):
    """Run fn(q, k, v, log_decay, initial_state) → (o, S); return o, S and every input gradient
    for the loss <o, do> + <S, dS> with random do, dS."""
    leaves = {n: None if x is None else x.detach().clone().requires_grad_() for n, x in inp.items()}
    o, S = fn(**leaves)
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
    dS = torch.randn(S.shape, generator=g, dtype=torch.float64).to(S.dtype)
    names = [n for n, x in leaves.items() if x is not None]
    gr = torch.autograd.grad([o, S], [leaves[n] for n in names], [do, dS])
    return o.detach(), S.detach(), dict(zip(names, gr))


def _naive(q, k, v, log_decay, initial_state):
    return naive_linear_scan(q, k, v, log_decay, initial_state=initial_state)


def _op(q, k, v, log_decay, initial_state, chunk_size=16):
    return linear_scan(q, k, v, log_decay, initial_state=initial_state, output_final_state=True,
                       chunk_size=chunk_size)


def compare(got, want, floor: float = 1e-30) -> Dict[str, float]:
    """Relative error of each output and gradient; ``floor`` bounds the denominator (for
    gradients that are ~0 when decays of exactly 0 cut the state off)."""
    (o, S, g), (ro, rS, rg) = got, want
    errs = {"o": rel_err(o, ro, floor), "S": rel_err(S, rS, floor)}
    for n in rg:
        errs["d" + n] = rel_err(g[n], rg[n], floor)
    return errs


# ---------------------------------------------------------------- reference vs naive (fp64)

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 63, 64, 200])
@pytest.mark.parametrize("with_h0", [False, True])
def test_reference_matches_naive(kind, T, with_h0):
    inp = make_inputs(kind, 2, T, 2, 8, 6, torch.float64, with_h0, seed=T)
    errs = compare(grads_of(_op, inp), grads_of(_naive, inp))
    worst = max(errs.values())
    assert worst < 1e-10, f"{kind} T={T} h0={with_h0}: worst rel err {worst:.2e} in {errs}"


@pytest.mark.parametrize("kind", ["head", "scalar", "vector"])
def test_reference_extreme_decays(kind):
    inp = make_inputs(kind, 1, 70, 2, 8, 8, torch.float64, True, seed=3, extreme=True)
    if kind == "head":
        inp["log_decay"] = torch.tensor([-math.inf, 0.0], dtype=torch.float64)
    got = grads_of(_op, inp)
    for name, t in [("o", got[0]), ("S", got[1])] + list(got[2].items()):
        assert torch.isfinite(t).all(), f"{kind}: non-finite {name}"
    # naive uses exp(-inf) = 0 where the reference clamps at exp(-40): they agree to ~1e-17
    # absolutely (d initial_state is ~0 itself when a decay of 0 cuts it off)
    errs = compare(got, grads_of(_naive, inp), floor=1.0)
    assert max(errs.values()) < 1e-9, f"{kind}: {errs}"


def test_opcheck_reference_op():
    from spcompile.kernels.linear_scan import op  # noqa: F401 (registers the op)
    for kind in KINDS:
        inp = make_inputs(kind, 1, 20, 2, 8, 4, torch.float32, True, seed=5)
        args = (inp["q"].requires_grad_(), inp["k"], inp["v"], inp["log_decay"],
                inp["initial_state"], 0.5, 8)
        torch.library.opcheck(torch.ops.spcompile.linear_scan.default, args)


# ---------------------------------------------------------------- Triton (interpreted) vs reference

# (kind, B, T, H, K, V, dtype, with_h0): odd lengths, partial chunks, K != V, bf16.
TRITON_CASES = [
    ("none", 1, 70, 2, 16, 32, "float32", True),
    ("head", 2, 37, 1, 32, 16, "float32", True),
    ("scalar", 1, 70, 2, 24, 40, "float32", False),
    ("scalar", 1, 1, 1, 16, 16, "float32", True),
    ("vector", 1, 70, 1, 16, 16, "float32", True),
    ("vector", 1, 20, 1, 24, 16, "float32", False),
    ("none", 1, 40, 1, 64, 64, "bfloat16", True),
    ("head", 1, 70, 1, 128, 128, "bfloat16", True),
    ("scalar", 1, 50, 2, 64, 64, "bfloat16", True),
    ("vector", 1, 40, 1, 64, 32, "bfloat16", True),
    ("scalar-extreme", 1, 70, 1, 16, 16, "float32", True),
    ("vector-extreme", 1, 36, 1, 16, 16, "float32", True),
    # the split state recurrence (per-chunk products + elementwise scan), CFG["state"]["SPLIT"]
    ("scalar-split", 1, 70, 1, 32, 16, "float32", True),
    ("vector-split", 1, 40, 1, 16, 32, "bfloat16", True),
]
_SPLIT_CFG = '{"state": {"SPLIT": 1, "BK": 16, "BV": 16}}'


def _candidate_cfg(i: int) -> str:
    """SPCOMPILE_TRITON_CFG pinning every kernel group to its i-th autotune candidate (cycling),
    so that the tile shapes the GPU autotuner may pick are all checked here."""
    from spcompile.kernels.linear_scan.triton_impl import CANDIDATES
    return json.dumps({n: c[i % len(c)] for n, c in CANDIDATES.items()})


def _n_candidates() -> int:
    try:
        from spcompile.kernels.linear_scan.triton_impl import CANDIDATES
    except ImportError:
        return 0
    return max(len(c) for c in CANDIDATES.values())


# every autotune candidate's tiles, at K = V = 128 so that no tile is clamped away
TRITON_CASES += [(f"scalar-cand{i}", 1, 70, 1, 128, 128, "float32", True)
                 for i in range(_n_candidates())]


def _case_id(c) -> str:
    return "-".join(str(x) for x in c)


def run_triton_case(case) -> Dict[str, float]:
    """Triton kernels (called directly) vs the reference in fp64: rel errors per output."""
    from spcompile.kernels.linear_scan import triton_impl
    kind, B, T, H, K, V, dt, with_h0 = case
    extreme, split = kind.endswith("-extreme"), kind.endswith("-split")
    cand = int(kind.split("-cand")[1]) if "-cand" in kind else None
    kind = kind.replace("-extreme", "").replace("-split", "").split("-cand")[0]
    inp = make_inputs(kind, B, T, H, K, V, getattr(torch, dt), with_h0, seed=T + K, extreme=extreme)
    scale = K ** -0.5

    def tri(q, k, v, log_decay, initial_state):
        return _TritonFn.apply(q, k, v, log_decay, initial_state, scale, triton_impl)

    def ref(q, k, v, log_decay, initial_state):
        up = lambda x: None if x is None else x.double()  # noqa: E731
        return chunked_linear_scan(up(q), up(k), up(v), up(log_decay), scale, up(initial_state),
                                   16)

    old = os.environ.get("SPCOMPILE_TRITON_CFG")
    pinned = _SPLIT_CFG if split else _candidate_cfg(cand) if cand is not None else None
    if pinned:
        os.environ["SPCOMPILE_TRITON_CFG"] = pinned
    try:
        return compare(grads_of(tri, inp), grads_of(ref, inp), floor=1.0 if extreme else 1e-30)
    finally:
        if pinned:
            os.environ.pop("SPCOMPILE_TRITON_CFG")
            if old is not None:
                os.environ["SPCOMPILE_TRITON_CFG"] = old


class _TritonFn(torch.autograd.Function):
    """Thin autograd wrapper over triton_impl's forward/backward (no custom-op dispatch)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, scale, impl):
        ctx.save_for_backward(q, k, v, log_decay, initial_state)
        ctx.scale, ctx.impl = scale, impl
        return impl.linear_scan_fwd(q, k, v, log_decay, scale, initial_state, 64)

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, log_decay, initial_state = ctx.saved_tensors
        g = ctx.impl.linear_scan_bwd(q, k, v, log_decay, ctx.scale, initial_state, 64,
                                     do.contiguous(), dS.contiguous())
        return (*g, None, None)


def run_op_case() -> Dict[str, float]:
    """The public op with SPCOMPILE_KERNEL=triton (custom-op plumbing) vs the reference op."""
    inp = make_inputs("scalar", 1, 45, 2, 16, 16, torch.float32, True, seed=11)
    old = os.environ.get("SPCOMPILE_KERNEL")
    os.environ["SPCOMPILE_KERNEL"] = "triton"
    try:
        got = grads_of(_op, inp)
    finally:
        if old is None:
            os.environ.pop("SPCOMPILE_KERNEL")
        else:
            os.environ["SPCOMPILE_KERNEL"] = old
    return compare(got, grads_of(lambda **kw: _op(**{n: None if x is None else x.double()
                                                     for n, x in kw.items()}), inp))


def _all_triton_results() -> Dict[str, Dict[str, float]]:
    out = {}
    for c in TRITON_CASES:
        try:
            out[_case_id(c)] = run_triton_case(c)
        except Exception as e:  # reported by the test that owns the case
            out[_case_id(c)] = {"error": f"{type(e).__name__}: {e}"}
    try:
        out["op"] = run_op_case()
    except Exception as e:
        out["op"] = {"error": f"{type(e).__name__}: {e}"}
    return out


@lru_cache(maxsize=1)
def _subprocess_results() -> Dict[str, Dict[str, float]]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("SPCOMPILE_KERNEL", None)
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--triton-json"], env=env,
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"interpreted Triton checks failed in a subprocess:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _result(key: str, fn):
    if _IN_PROCESS:
        return fn()
    return _subprocess_results()[key]


def _check(errs: Dict[str, float], tol: float, what: str, dg_tol: Optional[float] = None) -> None:
    """Every error under ``tol`` (``dg_tol`` for dlog_decay: a sum over many steps whose terms
    cancel, so bf16 rounding of q, k, states shows more there)."""
    assert "error" not in errs, f"{what}: {errs['error']}"
    bad = {n: e for n, e in errs.items()
           if not e < (dg_tol if n == "dlog_decay" and dg_tol else tol)}
    worst = max(errs, key=errs.get)
    assert not bad, f"{what}: {bad} over tol {tol} (worst {worst}={errs[worst]:.2e}); all {errs}"


triton_available = pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="triton not installed")


@triton_available
@pytest.mark.parametrize("case", TRITON_CASES, ids=_case_id)
def test_triton_matches_reference(case):
    errs = _result(_case_id(case), lambda: run_triton_case(case))
    if case[6] == "bfloat16":
        _check(errs, 2e-2, _case_id(case), dg_tol=5e-2)
    else:
        _check(errs, 1e-4, _case_id(case))


@triton_available
def test_autotune_picks_fastest_and_skips_failures():
    """The autotuner's choice (CUDA timing replaced by a fake timer): fastest wins, configs that
    fail to launch are skipped, all failing raises the first error; off on CPU/interpreter."""
    from spcompile.kernels.linear_scan import triton_impl as ti
    cands = [{"BK": 64, "t": 3.0}, {"BK": 32, "t": 1.0}, {"BK": 16, "t": None}, {"BK": 8, "t": 2.0}]
    launched = []

    def launch(cfg):
        launched.append(cfg["BK"])
        if cfg["t"] is None:
            raise RuntimeError("out of resources: shared memory")
        return cfg["t"]

    assert ti.pick_fastest(cands, launch, lambda fn: fn())["BK"] == 32
    assert 16 in launched  # tried, failed, skipped
    with pytest.raises(RuntimeError, match="out of resources"):
        ti.pick_fastest([cands[2]], launch, lambda fn: fn())
    assert not ti.autotune_enabled(torch.zeros(1))
    # every candidate list starts with the untuned default
    for name, lst in ti.CANDIDATES.items():
        assert {k: ti.CFG[name][k] for k in lst[0]} == lst[0], name


@triton_available
def test_triton_cfg_override_errors():
    from spcompile.kernels.linear_scan import triton_impl as ti
    old = os.environ.get("SPCOMPILE_TRITON_CFG")
    try:
        os.environ["SPCOMPILE_TRITON_CFG"] = '{"stat": {"BK": 32}}'
        with pytest.raises(ValueError, match="unknown kernels"):
            ti._cfg("state")
        os.environ["SPCOMPILE_TRITON_CFG"] = "BK=32"
        with pytest.raises(ValueError, match="JSON object"):
            ti._cfg("state")
        os.environ["SPCOMPILE_TRITON_CFG"] = '{"state": {"BK": 32}}'
        assert ti._cfg("dstate")["BK"] == 32 and ti._pinned("dstate") and not ti._pinned("o")
    finally:
        if old is None:
            os.environ.pop("SPCOMPILE_TRITON_CFG", None)
        else:
            os.environ["SPCOMPILE_TRITON_CFG"] = old


@triton_available
def test_triton_through_op():
    _check(_result("op", run_op_case), 1e-4, "op with SPCOMPILE_KERNEL=triton")


if __name__ == "__main__" and "--triton-json" in sys.argv:
    print(json.dumps(_all_triton_results()))
