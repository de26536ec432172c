"""Symbolic cost model, hardware profiles and planner for sequence-parallel strategies.

* :mod:`.formulas` — sympy expressions per strategy (and their lambdified twins);
* :mod:`.profiles` — machine numbers (presets in ``profiles/*.json``, or calibrated);
* :mod:`.planner` — ``plan``/``choose`` (ranked Choices with reasons), ``crossover``;
* :mod:`.calibrate` — measure alpha/beta and kernel throughput, write a profile;
* :mod:`.cli` — ``spcompile cost`` and ``spcompile calibrate``.
"""
from .planner import (KINDS, Choice, Crossover, InfeasibleStrategy, choose, clear_cache,
                      crossover, crossover_formula, expressions, plan, plan_cache_info)
from .profiles import Profile, default_hardware, load_profile, presets

__all__ = ["KINDS", "Choice", "Crossover", "InfeasibleStrategy", "Profile", "calibrate",
           "choose", "clear_cache", "crossover", "crossover_formula", "default_hardware",
           "expressions", "load_profile", "plan", "plan_cache_info", "presets"]


def calibrate(*args, **kwargs):  # noqa: D401 - thin lazy wrapper (keeps torch.distributed lazy)
    """Measure this machine and write a profile; see :func:`.calibrate.calibrate`."""
    from .calibrate import calibrate as _calibrate
    return _calibrate(*args, **kwargs)
