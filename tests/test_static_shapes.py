"""New input shapes recompile statically, and running out of recompiles is an error rather than
a silent eager run (which, on a shard, would be wrong)."""
import pytest
import torch
import torch._dynamo
import torch._dynamo.config as dcfg

import spcompile
from models import two_layer


def test_recompile_limit_is_an_error():
    old = (dcfg.recompile_limit, dcfg.automatic_dynamic_shapes,
           getattr(dcfg, "fail_on_recompile_limit_hit", None))
    try:
        torch._dynamo.reset()
        dcfg.recompile_limit = 2
        m = two_layer("mul")
        c = torch.compile(m, backend=spcompile.backend())
        for T in (8, 16):  # a second length recompiles statically (no symbolic T)
            x = torch.randn(1, T, 16)
            torch.testing.assert_close(c(x), m(x), rtol=1e-4, atol=1e-5)
        assert dcfg.automatic_dynamic_shapes is False
        with pytest.raises(Exception, match="recompile_limit|FailOnRecompileLimitHit|fail_on"):
            c(torch.randn(1, 24, 16))
    finally:
        dcfg.recompile_limit, dcfg.automatic_dynamic_shapes = old[0], old[1]
        if old[2] is not None:
            dcfg.fail_on_recompile_limit_hit = old[2]
        torch._dynamo.reset()
