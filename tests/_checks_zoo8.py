"""Worker-side checks for tests/test_zoo8_dist.py: the spellings of tests/models_zoo8.py on
gloo ranks, each in its outcome class (tests/_outcomes.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import models_zoo5 as Z5
import models_zoo8 as Z
from _outcomes import exact, gathered, refused


def check_fla_references(rank, P, rec):
    exact(rank, P, rec, "fla torch_simple_gla (state buffer loop over chunks)",
          Z.SimpleGLANaiveChunk, Z.inp, kinds={"loop_scan"}, T=Z.T)
    exact(rank, P, rec, "fla naive_recurrent_gla", Z.NaiveRecurrentGLA, Z.inp,
          kinds={"loop_scan"}, T=Z.T)
    exact(rank, P, rec, "fla naive_chunk_linear_attn", Z.NaiveChunkLinearAttn, Z.inp,
          kinds={"cumsum", "halo"}, T=Z.T)
    exact(rank, P, rec, "fla naive_chunk_linear_attn + normalize_output",
          lambda: Z.NaiveChunkLinearAttn(normalize=True), Z.inp, kinds={"cumsum"}, T=Z.T)
    exact(rank, P, rec, "fla naive_recurrent_hgrn", Z.HGRNRecurrent, Z.inp,
          kinds={"loop_scan"}, T=Z.T)
    exact(rank, P, rec, "fla naive_recurrent_rwkv6 (bonus readout)", Z.RWKV6Naive, Z.inp,
          kinds={"loop_scan"}, T=Z.T)
    exact(rank, P, rec, "mamba-minimal (einops.einsum, conv1d[..., :l])", Z.MambaMinimal,
          Z.inp, kinds={"loop_scan", "halo"}, T=Z.T)
    exact(rank, P, rec, "mamba_ssm ssd_minimal_discrete in einops, final state returned",
          Z.SSDMinimalEinops, Z.inp, kinds={"linear_scan"}, T=Z.T)


def check_chunk_loops(rank, P, rec):
    for mode in ("fla", "write", "list"):
        be = exact(rank, P, rec, f"loop over the chunk axis ({mode})",
                   lambda mode=mode: Z.ChunkStateLoop(mode), Z.inp, kinds={"loop_scan"}, T=Z.T)
        steps = [m.info.get("steps") for r in be.reports for m in r.matches
                 if m.kind == "loop_scan"]
        rec.true(f"loop over the chunk axis ({mode}): one step per local chunk",
                 steps == [Z.T // P // 4], str(steps))
    refused(rank, P, rec, "loop over the chunk axis starting from a chunk (S[:, 0] = kv[:, 0])",
            lambda: Z.ChunkStateLoop("inclusive"), Z.inp, T=Z.T,
            text=("loop over tokens or chunks", "no carried state"))


def check_spellings(rank, P, rec):
    exact(rank, P, rec, "FLASH mixed chunk attention (einops, F.pad on the chunk axis)",
          Z.FlashMixedChunk, Z.inp, kinds={"cumsum", "halo"}, T=Z.T)
    exact(rank, P, rec, "einops heads + SDPA is_causal", Z.EinopsSDPA, Z.inp,
          kinds={"attention"}, T=Z.T)
    exact(rank, P, rec, "lucidrains triu(j - i + 1) mask, -finfo.max", Z.LucidrainsCausal,
          Z.inp, kinds={"attention"}, T=Z.T)
    exact(rank, P, rec, "GPT-NeoX cos_cached[:, :, :seq_len]", Z.NeoXRotary, Z.inp,
          kinds={"attention", "positions"}, T=Z.T)
    exact(rank, P, rec, "RetNet with xPos (pos / 512 is no row count)", Z.RetNetXPos, Z.inp,
          kinds={"linear_scan", "positions"}, T=Z.T)
    exact(rank, P, rec, "torch.roll shift, xs[:, 0] = 0", Z.RollShift, Z.inp,
          kinds={"halo"}, T=Z.T)
    exact(rank, P, rec, "torch.roll shift times (arange > 0)", lambda: Z.RollShift(False),
          Z.inp, kinds={"halo", "positions"}, T=Z.T)


def check_statistics(rank, P, rec):
    for name, f in Z.STATISTICS.items():
        be = exact(rank, P, rec, name, lambda f=f: Z.Statistic(f), Z.inp, kinds={"reduction"},
                   T=Z.T)
        strategies = [m.strategy for r in be.reports for m in r.matches]
        rec.true(f"{name}: all-reduced, not gathered", strategies == ["allreduce"] * len(
            strategies) and len(strategies) >= 1, str(strategies))
    be = exact(rank, P, rec, "vector_norm / normalize over the features: local",
               lambda: Z.Statistic(lambda y: F.normalize(y, dim=-1) *
                                   torch.linalg.vector_norm(y, dim=-1, keepdim=True)),
               Z.inp, T=Z.T)
    rec.true("norms over the features: no collective", not any(
        r.matches for r in be.reports), str([str(m) for r in be.reports for m in r.matches]))
    exact(rank, P, rec, "attention pooling softmax(x @ q, dim=1)", Z.AttentionPool, Z.inp,
          kinds={"reduction"}, T=Z.T)
    exact(rank, P, rec, "v @ x.transpose(1, 2) softmax over tokens", Z.VectorTimesTokens,
          Z.inp, kinds={"reduction"}, T=Z.T)


def check_replicated_queries(rank, P, rec):
    for name, mk, mi in [("Perceiver latents over the sequence", Z.PerceiverLatents, Z.inp),
                         ("latents, enable_gqa", lambda: Z.PerceiverLatents(gqa=True), Z.inp),
                         ("pooling nn.MultiheadAttention", Z.PoolingMHA, Z.inp),
                         ("pooling SDPA with a key padding mask", Z.PaddedPooling,
                          Z.inp_mask),
                         ("pooling SDPA, one sample's keys all masked", Z.PaddedPooling,
                          Z.inp_mask_empty_row)]:
        be = exact(rank, P, rec, name, mk, mi, kinds={"attention"}, T=Z.T)
        rec.true(f"{name}: replicated-query form",
                 any(m.pattern == "sdpa_replicated_queries" for r in be.reports
                     for m in r.matches),
                 str([m.pattern for r in be.reports for m in r.matches]))


def latents_pooled(rank, P, rec):
    be = exact(rank, P, rec, "latents then sum / mean over the latent axis",
               Z.LatentsPooledHead, Z.inp, kinds={"attention"}, T=Z.T)
    rec.true("latents pooled: nothing reduced over the sequence after the attention",
             not any(m.kind == "reduction" for r in be.reports for m in r.matches),
             str([str(m) for r in be.reports for m in r.matches]))


def check_p4(rank, P, rec):
    latents_pooled(rank, P, rec)
    exact(rank, P, rec, "fla torch_simple_gla at 4 chunks per rank", Z.SimpleGLANaiveChunk,
          Z.inp64, kinds={"loop_scan"}, T=2 * Z.T)
    for mode in ("fla", "list"):
        # two chunks per rank: the last (dead) update cannot be checked against another one
        refused(rank, P, rec, f"loop over the chunk axis ({mode}), two chunks per rank",
                lambda mode=mode: Z.ChunkStateLoop(mode), Z.inp, T=Z.T,
                text=("only two steps per rank",))
    exact(rank, P, rec, "loop over the chunk axis (list), two chunks per rank, final state "
          "returned", lambda: Z.ChunkStateLoop("list", final=True), Z.inp,
          kinds={"loop_scan", "shape"}, T=Z.T)
    refused(rank, P, rec, "zoo5 chunk view loop, two chunks per rank", Z5.ChunkViewLoop,
            text=("only two steps per rank",))
    exact(rank, P, rec, "fla naive_recurrent_rwkv6 (bonus readout)", Z.RWKV6Naive, Z.inp,
          kinds={"loop_scan"}, T=Z.T)
    for name in ("y.std(dim=1)", "torch.logsumexp(y, dim=1)", "y.norm(dim=1)"):
        exact(rank, P, rec, name, lambda f=Z.STATISTICS[name]: Z.Statistic(f), Z.inp,
              kinds={"reduction"}, T=Z.T)
    exact(rank, P, rec, "Perceiver latents over the sequence", Z.PerceiverLatents, Z.inp,
          kinds={"attention"}, T=Z.T)
    exact(rank, P, rec, "pooling SDPA with a key padding mask", Z.PaddedPooling, Z.inp_mask,
          kinds={"attention"}, T=Z.T)


def check_latents(rank, P, rec):
    latents_pooled(rank, P, rec)


def check_convolutions(rank, P, rec):
    for name, mk in [("conv padding='same', k=3", lambda: Z.CentredConv(3)),
                     ("conv padding='same', k=4 (uneven sides)", lambda: Z.CentredConv(4)),
                     ("conv padding='same', dilation 2", lambda: Z.CentredConv(3, "same", 2)),
                     ("conv padding=(k - 1) // 2, k=5", lambda: Z.CentredConv(5, 2)),
                     ("F.pad(x, (2, 1)) then conv k=4", lambda: Z.CentredConv(4, pad=(2, 1)))]:
        exact(rank, P, rec, name, mk, Z.inp, kinds={"halo"}, T=Z.T)
    exact(rank, P, rec, "Conformer conv module, BatchNorm1d in eval", lambda:
          Z.ConformerConvModule(train=False), Z.inp, kinds={"halo"}, T=Z.T)
    exact(rank, P, rec, "Conformer conv module, BatchNorm1d in training",
          Z.ConformerConvModule, Z.inp, kinds={"halo", "reduction"}, T=Z.T)
    for form in ("bct", "heads", "instance"):
        exact(rank, P, rec, f"group / instance norm over the sequence ({form})",
              lambda form=form: Z.GroupNormOverTime(form), Z.inp, kinds={"reduction"}, T=Z.T)
    gathered(rank, P, rec, "F.group_norm with the sequence as channels",
             Z.GroupNormSequenceChannels, Z.inp, ops=("group_norm",), file="models_zoo8.py",
             T=Z.T)
    exact(rank, P, rec, "torch.batch_norm (its own argument order) in training",
          Z.TorchBatchNorm, Z.inp, kinds={"reduction"}, T=Z.T)
    running_statistics(rank, P, rec)


def running_statistics(rank, P, rec):
    """BatchNorm1d's running statistics after one sharded training step equal the
    full-sequence ones (the unbiased variance over every rank's tokens)."""
    import copy

    import torch
    import torch._dynamo

    import spcompile
    torch.manual_seed(0)
    model = Z.ConformerConvModule()
    x = Z.inp()[0]
    sharded = copy.deepcopy(model)
    model(x)
    torch._dynamo.reset()
    torch.compile(sharded, backend=spcompile.backend())(spcompile.shard_sequence(x, dim=1))
    rec.close("BatchNorm1d running_mean after a sharded step", sharded.bn.running_mean,
              model.bn.running_mean, 1e-5)
    rec.close("BatchNorm1d running_var after a sharded step", sharded.bn.running_var,
              model.bn.running_var, 1e-5)
    rec.true("BatchNorm1d num_batches_tracked advanced once",
             int(sharded.bn.num_batches_tracked) == 1, str(int(sharded.bn.num_batches_tracked)))


def check_p4_convolutions(rank, P, rec):
    exact(rank, P, rec, "conv padding='same', k=4 (uneven sides)", lambda: Z.CentredConv(4),
          Z.inp, kinds={"halo"}, T=Z.T)
    exact(rank, P, rec, "GroupNorm on [B, C, T]", Z.GroupNormOverTime, Z.inp,
          kinds={"reduction"}, T=Z.T)
    exact(rank, P, rec, "Conformer conv module, BatchNorm1d in training",
          Z.ConformerConvModule, Z.inp, kinds={"halo", "reduction"}, T=Z.T)
    running_statistics(rank, P, rec)
