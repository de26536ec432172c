"""Hardware profiles: machine numbers for the cost formulas, as JSON data files.

A profile holds the effective flop rate ``F`` and memory bandwidth ``M`` of one device and a list
of network *levels*, innermost first (e.g. NVLink inside a node of 8, then InfiniBand).  Each
level gives ``alpha``/``beta`` per collective (``p2p``, ``allgather``, ``allreduce``,
``alltoall``; a plain number means the same for all).  A level's ``ranks`` is how many ranks it
spans (``null``: everything).

How a hierarchical profile turns into one (alpha, beta) for a strategy on P ranks:

* collectives (all-gather, all-reduce, all-to-all) run as rings over all P ranks; every step
  waits for its slowest link, so they take the parameters of the *innermost level that spans P*
  (P ≤ 8: NVLink; beyond: InfiniBand).
* chains (``pattern="chain"``: ring of states, All-Scan) hop r → r+1; of the P-1 hops,
  ``ceil(P/s_i) - 1`` cross a level-i boundary.  The chain's alpha and 1/beta are the hop-count
  weighted means, which is exact for the un-pipelined ring and slightly optimistic for the
  pipelined All-Scan (whose steady state is set by its slowest hop).
* a single neighbour exchange (``pattern="hop"``, halos) waits for the slowest hop: like a
  collective.

Lookup order for ``hardware=None``: env ``SPCOMPILE_HARDWARE`` (a preset name or a path), then a
calibrated profile at ``~/.cache/spcompile/profile.json``, then ``cpu_gloo`` without CUDA (and
``h100_cluster`` with it).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

PRESET_DIR = Path(__file__).with_name("profiles")
CACHE_PATH = Path(os.path.expanduser("~/.cache/spcompile/profile.json"))
COLLECTIVES = ("p2p", "allgather", "allreduce", "alltoall")
PATTERNS = ("collective", "chain", "hop")


class Profile:
    """Machine numbers for the formulas.  Immutable; hashable by content (cache keys)."""

    def __init__(self, data: Dict[str, Any], source: str = "<dict>") -> None:
        self.source = source
        self.name: str = str(data.get("name", "unnamed"))
        self.description: str = str(data.get("description", ""))
        try:
            self.flops = float(data["F"])
            self.mem_bw = float(data["M"])
            levels = data["levels"]
        except KeyError as err:
            raise ValueError(f"hardware profile {source}: missing key {err.args[0]!r} (need F, "
                             f"M, levels)") from None
        if not levels:
            raise ValueError(f"hardware profile {source}: 'levels' is empty")
        self.levels: List[Dict[str, Any]] = []
        for i, lv in enumerate(levels):
            ranks = lv.get("ranks")
            if ranks is None and i != len(levels) - 1:
                raise ValueError(f"hardware profile {source}: only the outermost level may "
                                 f"have ranks=null")
            self.levels.append({"name": lv.get("name", f"level{i}"), "ranks": ranks,
                                "alpha": _per_collective(lv, "alpha", source),
                                "beta": _per_collective(lv, "beta", source)})
        for a, b in zip(self.levels, self.levels[1:]):
            if b["ranks"] is not None and b["ranks"] <= a["ranks"]:
                raise ValueError(f"hardware profile {source}: levels must grow outward")
        self.data = data
        self.fingerprint = json.dumps(
            {"F": self.flops, "M": self.mem_bw, "levels": self.levels}, sort_keys=True)

    # -- identity --
    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Profile) and other.fingerprint == self.fingerprint

    def __repr__(self) -> str:
        return f"Profile({self.name!r}, F={self.flops:.3g}, M={self.mem_bw:.3g}, " \
               f"levels={[lv['name'] for lv in self.levels]})"

    # -- lookups --
    def _level_spanning(self, nranks: int) -> Dict[str, Any]:
        for lv in self.levels:
            if lv["ranks"] is None or nranks <= lv["ranks"]:
                return lv
        return self.levels[-1]

    def link(self, collective: str, nranks: int, pattern: str = "collective"
             ) -> Tuple[float, float]:
        """(alpha, beta) of ``collective`` over ``nranks`` ranks used in ``pattern``."""
        if collective not in COLLECTIVES:
            raise ValueError(f"collective must be one of {COLLECTIVES}; got {collective!r}")
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}; got {pattern!r}")
        if pattern != "chain" or nranks <= 1 or len(self.levels) == 1:
            lv = self._level_spanning(max(nranks, 1))
            return lv["alpha"][collective], lv["beta"][collective]
        hops = nranks - 1
        # crossings[i]: hops that leave a group of level i (i.e. use level i+1 or beyond)
        crossings = [math.ceil(nranks / lv["ranks"]) - 1 if lv["ranks"] else 0
                     for lv in self.levels]
        a_sum = inv_b_sum = 0.0
        prev = hops
        for i, lv in enumerate(self.levels):
            n = prev - crossings[i]
            prev = crossings[i]
            a_sum += n * lv["alpha"][collective]
            inv_b_sum += n / lv["beta"][collective]
        return a_sum / hops, hops / inv_b_sum

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=False)

    def save(self, path: Union[str, Path]) -> Path:
        p = Path(path).expanduser()
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json() + "\n")
        return p


def _per_collective(level: Dict[str, Any], key: str, source: str) -> Dict[str, float]:
    val = level.get(key)
    if val is None:
        raise ValueError(f"hardware profile {source}: level {level.get('name')!r} lacks {key!r}")
    if isinstance(val, (int, float)):
        return {c: float(val) for c in COLLECTIVES}
    default = val.get("default")
    out = {}
    for c in COLLECTIVES:
        v = val.get(c, default)
        if v is None:
            raise ValueError(f"hardware profile {source}: level {level.get('name')!r} has no "
                             f"{key} for {c!r} (and no 'default')")
        if float(v) <= 0:
            raise ValueError(f"hardware profile {source}: {key}[{c}] must be > 0; got {v}")
        out[c] = float(v)
    return out


def presets() -> List[str]:
    """Names of the bundled presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


_LOADED: Dict[str, Profile] = {}


def load_profile(spec: Union[str, Path, Profile, None] = None) -> Profile:
    """A Profile from a preset name, a JSON path, a Profile, or None (the default lookup)."""
    if isinstance(spec, Profile):
        return spec
    if spec is None:
        spec = default_hardware()
    spec = str(spec)
    path = Path(spec).expanduser()
    if not (path.suffix == ".json" or os.sep in spec):
        path = PRESET_DIR / f"{spec}.json"
        if not path.exists():
            raise ValueError(f"unknown hardware profile {spec!r}; presets: {presets()}, or give a "
                             f"path to a JSON profile (see `spcompile calibrate`)")
    key = str(path.resolve())
    mtime = path.stat().st_mtime if path.exists() else None
    cached = _LOADED.get(key)
    if cached is not None and getattr(cached, "_mtime", None) == mtime:
        return cached
    if not path.exists():
        raise FileNotFoundError(f"hardware profile file {path} does not exist")
    prof = Profile(json.loads(path.read_text()), source=str(path))
    prof._mtime = mtime  # type: ignore[attr-defined]
    _LOADED[key] = prof
    return prof


def default_hardware() -> str:
    """The profile used when none is given (see the module docstring for the order)."""
    env = os.environ.get("SPCOMPILE_HARDWARE")
    if env:
        return env
    if CACHE_PATH.exists():
        return str(CACHE_PATH)
    try:
        import torch
        if torch.cuda.is_available():
            return "h100_cluster"
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return "cpu_gloo"


def profile_values(profile: Profile, collective: str, nranks: int, pattern: str = "collective"
                   ) -> Dict[str, float]:
    """The machine symbols' values for one strategy: alpha, beta, F, M."""
    a, b = profile.link(collective, nranks, pattern)
    return {"alpha": a, "beta": b, "F": profile.flops, "M": profile.mem_bw}


def describe(profile: Profile, nranks: Optional[int] = None) -> str:
    """One line per level (and the effective links at ``nranks`` when given)."""
    lines = [f"{profile.name}: F={profile.flops:.3g} flop/s, M={profile.mem_bw:.3g} B/s"]
    for lv in profile.levels:
        span = "all" if lv["ranks"] is None else lv["ranks"]
        pairs = ", ".join(f"{c}: a={lv['alpha'][c]:.2e}s b={lv['beta'][c]:.2e}B/s"
                          for c in COLLECTIVES)
        lines.append(f"  {lv['name']} (ranks {span}): {pairs}")
    if nranks:
        for c, pat in (("allgather", "collective"), ("p2p", "chain")):
            a, b = profile.link(c, nranks, pat)
            lines.append(f"  at P={nranks}: {c}/{pat} a={a:.2e}s b={b:.2e}B/s")
    return "\n".join(lines)
