"""Microbenchmarks of one MSPLoRA linear layer against the frozen linear alone, the unfused reference and PEFT
LoRA (``python -m benchmarks.run``), and a pytest-benchmark suite for regression tracking (``pytest benchmarks``)."""
