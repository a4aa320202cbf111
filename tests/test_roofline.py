"""The roofline model (``python -m benchmarks.roofline``): its launches are the backend's, and its
predictions move the way the design says they should."""
import pytest

from benchmarks import roofline

LLAMA = (8192, 4096, 4096)


def test_launch_lists_match_what_the_backend_launches():
    """Same launches as ``tune.count_launches`` counts at M >= 8192 (two reductions summed by torch)."""
    unfused = roofline.layer_launches(*LLAMA, (8, 4, 2), 0.05, "unfused")
    fused = roofline.layer_launches(*LLAMA, (8, 4, 2), 0.05, "fused")
    assert (len(unfused["forward"]), len(unfused["backward"])) == (3, 7)
    assert (len(fused["forward"]), len(fused["backward"])) == (2, 6)


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
