from setuptools import find_packages, setup

TEST = ["pytest>=8", "pytest-benchmark>=4", "peft>=0.13", "accelerate>=1.0", "matplotlib>=3.7", "bitsandbytes>=0.50"]

setup(
    name="msplora",
    version="0.1.0",
    description="Multi-Scale Pyramid LoRA (MSPLoRA) with fused Triton kernels for PyTorch and Hugging Face models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The benchmarks live in ./benchmarks (``python -m benchmarks.run`` from the checkout) and install as
    # ``msplora_benchmarks`` (``python -m msplora_benchmarks.run`` from any folder), never as a generic top-level name.
    packages=find_packages(include=["msplora", "msplora.*", "msplora_kernels", "msplora_kernels.*"])
    + ["msplora_benchmarks"],
    package_dir={"msplora_benchmarks": "benchmarks"},
    package_data={"msplora": ["data/*.txt"], "msplora_kernels": ["_cpu/*.c"]},  # the demo's text (Genesis, King James Version, public domain)
    entry_points={"console_scripts": ["msplora-demo = msplora.demo:main"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={"test": TEST, "peft": ["peft>=0.13"], "glue": ["datasets>=2.14", "evaluate>=0.4", "scipy", "scikit-learn"],
                    "demo": ["gguf>=0.10"]},
    license="Apache-2.0",
)
