"""Other code bases' layouts on 2 gloo ranks: timm's unbind(0) qkv, Megatron's sequence-first
[s, b, h] core attention (baddbmm) next to a sequence-first linear attention (seq_dim=0),
nn.MultiheadAttention / nn.TransformerEncoder lowered to SDPA."""
from dist_harness import assert_rows, run_checks


def test_layouts_sharded_equal_eager():
    assert_rows(run_checks("_checks_layouts", ["check_timm", "check_seq_first",
                                                    "check_torch_nn_attention"], 2))
