"""Measured fused-vs-unfused times per key, read by ``tuning.prefer_fused`` (the fused GEMM runs only where an
entry here says it is at least 3% faster). Written by ``python -m msplora_kernels._triton.tune`` on a GPU
(``benchmarks/gpu_check.sh`` runs it) and committed; each entry records the device, commit and date.

No GPU has measured yet: the table is empty, so ``auto`` runs cuBLAS + our low-rank kernels everywhere.
"""

ENTRIES = []
