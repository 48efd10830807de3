"""`bench.k`'s widening of a scenario to CLIP's width keeps every cosine, so the search at
D = 512 answers for the same data; its options are checked before any run."""

import pytest
import torch
from torch.nn import functional as F

from semclust.bench import k as bench_k


def test_widen_keeps_every_cosine():
    x = F.normalize(torch.randn(50, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=1)
    w = bench_k.widen(x, 31)
    assert w.shape == (50, 31)
    torch.testing.assert_close(w @ w.T, x @ x.T, rtol=0, atol=1e-12)
    assert torch.equal(bench_k.widen(x, 31), w)  # one fixed map
    with pytest.raises(ValueError, match="at least the rows' 7 dimensions"):
        bench_k.widen(x, 6)


@pytest.mark.parametrize("argv,message", [(["--sample", "1"], "k_search.sample must be >= 2"),
                                          (["--dim", "0"], "--dim must be >= 1")])
def test_bad_options_stop_before_any_run(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_k.main(argv)
    assert message in capsys.readouterr().err
