"""Private Triton kernels (``kernels``) and their launch choices (``tuning``); use ``triton_backend``."""
