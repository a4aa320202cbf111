"""The roofline model (``python -m benchmarks.roofline``): its launches are the backend's, and its
predictions move the way the design says they should."""
import pytest

from benchmarks import roofline

LLAMA = (8192, 4096, 4096)


def test_launch_lists_match_what_the_backend_launches():
    """Same launches as ``tune.count_launches`` counts for a whole layer call (tests/test_triton_dispatch.py)
    at M >= 8192, where both reductions are split (their partials summed by one launch)."""
    unfused = roofline.layer_launches(*LLAMA, (8, 4, 2), 0.05, "unfused")
    fused = roofline.layer_launches(*LLAMA, (8, 4, 2), 0.05, "fused")
    assert (len(unfused["forward"]), len(unfused["backward"])) == (4, 5)
    assert (len(fused["forward"]), len(fused["backward"])) == (3, 4)


def test_its_tiles_and_rules_are_the_backends(monkeypatch):
    """The constants the model assumes are the ones the launcher uses on sm_90 (bf16)."""
    tuning = pytest.importorskip("msplora_kernels._triton.tuning")
    import torch

    monkeypatch.setattr(tuning, "_arch", lambda device: 9)
    gpu = torch.device("cuda", 0)
    assert tuning._GRAD_SB_16BIT[9].block_m == roofline.GRAD_BLOCK_M
    assert tuning._GRAD_SB_16BIT[9].max_block_r == roofline.MAX_RANK_TILE == tuning._LOW_RANK_16BIT[9].max_block_r
    assert tuning.reduction_splits(8192, gpu) == roofline.SPLITS
    for ranks in [(8, 4, 2), (16, 8, 4), (32, 16, 8), (64, 32, 16), (5, 3, 1)]:
        r = sum(ranks)
        _, block_r, one_pass = tuning.grad_sb_config(gpu, torch.bfloat16, r)
        assert (block_r, one_pass) == (roofline.rank_tile(r), roofline.grad_sb_one_sweep(r)), ranks
        assert roofline.rank_steps(ranks) == sum(-(-r // tuning.rank_step(ranks, 64)) * tuning.rank_step(ranks, 64)
                                                 for r in ranks)


def test_the_backends_dS_dB_rule_is_the_cheaper_sweep():
    """One sweep over dy (fp32 partials per 256-row tile) where the ranks are narrow, two where wide."""
    def backward(ranks, ds_db):
        return roofline.predict(*LLAMA, ranks, 0.0, "unfused", ds_db=ds_db)["backward"]

    for ranks in [(8, 4, 2), (16, 8, 4), (64, 32, 16)]:
        chosen = "one" if roofline.grad_sb_one_sweep(sum(ranks)) else "two"
        assert backward(ranks, chosen) <= min(backward(ranks, "one"), backward(ranks, "two"))
    assert backward((8, 4, 2), "one") < backward((8, 4, 2), "separate")  # dy read once, not twice
    # Ranks padded to multiples of 16 cost no more than power-of-two steps (less where they differ).
    fused = lambda pad: roofline.predict(*LLAMA, (64, 32, 16), 0.05, "fused", rank_padding=pad)["fwd+bwd"]  # noqa: E731
    assert fused("16") < fused("pow2")


def test_predictions_are_ordered_as_the_design_says():
    at = lambda **kw: roofline.predict(*LLAMA, (8, 4, 2), **kw)["ratio_fwd+bwd"]  # noqa: E731
    bare = at(p=0.0, path="bare")
    one_pass, redraw = at(p=0.05, path="unfused"), at(p=0.05, path="unfused", rng="redraw")
    assert bare == pytest.approx(1.0)
    assert 1.0 < at(p=0.0, path="fused") < at(p=0.0, path="unfused") < one_pass < redraw
    assert at(p=0.05, path="fused") < one_pass
    # A longer N amortises the low-rank work over a bigger GEMM.
    assert roofline.predict(8192, 4096, 11008, (8, 4, 2), 0.05, "unfused")["ratio_fwd+bwd"] < one_pass


def test_the_gemm_bound_is_flops_over_peak():
    (gemm,) = roofline.layer_launches(*LLAMA, (8, 4, 2), 0.0, "bare")["forward"]
    seconds, what = gemm.bound()
    assert what == "tensor" and seconds == pytest.approx(2 * 8192 * 4096 * 4096 / roofline.PEAK_FLOPS)


def test_command_line_prints_every_case(capsys):
    assert roofline.main(["--shape", "4096,4096,4096", "--ranks", "64,32,16", "--launches"]) == 0
    out = capsys.readouterr().out
    assert "4096x4096x4096" in out and "shrink" in out and "redraw" in out
    with pytest.raises(SystemExit):
        roofline.main(["--shape", "1,2"])
