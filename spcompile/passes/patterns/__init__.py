"""Pattern families, in the order detection tries them."""
from .base import FailedMatch, Found, Match, Pattern
from .linear_attention import MaskedLinearAttention
from .constant_mix import ConstantCausalMix
from .softmax_attention import ManualSoftmaxAttention
from .cumsum_form import CumsumLinearAttention
from .sequence_ops import (CausalConv1d, CrossEntropy, FixedPositionWrite, LeadingRowScan,
                           PaddedWindows, Positions, SDPAttention, SequenceBatchNorm,
                           SequenceDiff, SequenceFlip, SequenceGroupNorm, SequenceIndex,
                           SequenceReduction, SequenceRoll, SequenceScan, SequenceSoftmax,
                           SequenceStatistic, ShapeOnlySlice, ShiftedLoss, TokenShift)


def all_patterns():
    """Every registered family (new families append themselves here)."""
    return [cls() for cls in REGISTRY]


REGISTRY = [MaskedLinearAttention, ConstantCausalMix, ManualSoftmaxAttention, SDPAttention,
            CausalConv1d, TokenShift,
            SequenceRoll, SequenceFlip, ShapeOnlySlice, PaddedWindows, SequenceDiff, Positions,
            SequenceReduction, SequenceStatistic, SequenceBatchNorm, SequenceGroupNorm,
            ShiftedLoss, CrossEntropy, SequenceIndex, SequenceSoftmax,
            CumsumLinearAttention, LeadingRowScan, SequenceScan, FixedPositionWrite]
from .declared import DeclaredScan; REGISTRY.insert(0, DeclaredScan)  # noqa: E402,E702 (first: annotations)
from .chunk_recurrence import ChunkStateRecurrence  # noqa: E402 (before the masked forms)
REGISTRY.insert(1, ChunkStateRecurrence)
from .loop_recurrence import LoopRecurrence  # noqa: E402 (owns the whole unrolled loop)
REGISTRY.insert(2, LoopRecurrence)
from .loop_relay import LoopRelay, RNNRelay  # noqa: E402 (loops with no all-gather form)
REGISTRY.insert(3, LoopRelay)
REGISTRY.insert(4, RNNRelay)
from .associative_scan import AssociativeScan  # noqa: E402 (owns the inlined scan)
REGISTRY.insert(5, AssociativeScan)
from .token_dispatch import TokenDispatch  # noqa: E402 (reports MoE dispatch; rewrites nothing)
REGISTRY.append(TokenDispatch)

__all__ = ["FailedMatch", "Found", "Match", "Pattern", "REGISTRY", "all_patterns"]
