"""pytest-benchmark suite for regression tracking (not part of CI): ``pytest benchmarks/``.

One MSPLoRA linear layer per provider and mode, at a small CPU shape and, on CUDA, a Llama-7B projection in
bf16. Compare runs with ``pytest benchmarks/ --benchmark-autosave`` then ``pytest-benchmark compare``.
"""
import pytest
import torch

from benchmarks import measure, providers

CPU_CASES = [providers.Case(1024, 1024, 1024, (8, 4, 2), p, torch.float32, torch.device("cpu")) for p in (0.0, 0.05)]
CUDA_CASES = [providers.Case(4096, 4096, 4096, (8, 4, 2), p, torch.bfloat16, torch.device("cuda")) for p in (0.0, 0.05)]
CASES = CUDA_CASES if torch.cuda.is_available() else CPU_CASES
PROVIDERS = [p for p in providers.ALL_PROVIDERS if p != "triton_gemm"]


@pytest.mark.parametrize("mode", measure.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_layer(benchmark, case, provider, mode):
    available, notes = providers.available_providers([provider], case.device)
    if not available:
        pytest.skip(notes[0])
    x, linear, dy = providers.make_inputs(case)
    built = providers.build_provider(provider, case, x, linear)
    run = measure.mode_callable(built, mode, dy)

    def step() -> None:
        run()
        if case.device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(shape=[case.m, case.k, case.n], ranks=list(case.ranks), dropout=case.dropout)
    benchmark.pedantic(step, setup=lambda: measure.clear_grads(built.grads), rounds=20, warmup_rounds=3)


def test_triton_gemm(benchmark):
    case = CASES[0]
    available, notes = providers.available_providers(["triton_gemm"], case.device)
    if not available:
        pytest.skip(notes[0])
    x, linear, _ = providers.make_inputs(case)
    built = providers.build_provider("triton_gemm", case, x, linear)

    def step() -> None:
        built.forward()
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=20, warmup_rounds=3)
