"""Pattern families, in the order detection tries them."""
from .base import FailedMatch, Found, Match, Pattern
from .linear_attention import MaskedLinearAttention


def all_patterns():
    """Every registered family (new families append themselves here)."""
    return [cls() for cls in REGISTRY]


REGISTRY = [MaskedLinearAttention]

__all__ = ["FailedMatch", "Found", "Match", "Pattern", "REGISTRY", "all_patterns"]
