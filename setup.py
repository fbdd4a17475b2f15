"""hpcllm — data-parallel GPT training and batched offline inference on MPI/Slurm clusters."""

from pathlib import Path

from setuptools import find_packages, setup

# Kept as plain literals: tests/test_packaging.py checks environment.yml names the same packages.
INSTALL_REQUIRES = [
    # a range, so that a cluster's own (CUDA) torch is kept: `pip install hpcllm` must not replace it.
    # The exact CPU build the tests run on is pinned in constraints.txt (the Makefile and CI use it).
    "torch>=2.11,<2.16",
    "numpy>=1.24",
    "h5py>=3.8",
    "mpi4py>=3.1",
    "submitit>=1.5",
    "jinja2>=3.1.6",  # chat templates are untrusted code: older sandboxes have known escapes
    "pyyaml>=6.0",
    "tqdm>=4.60",
    "safetensors>=0.4",
    "tokenizers>=0.15",
    "matplotlib>=3.7",
    "psutil>=5.9",  # a start's process start time (hpcllm.provenance)
    "prometheus_client>=0.17",  # live metrics: metrics.prometheus_dir / metrics.pushgateway (hpcllm.monitor)
]

EXTRAS_REQUIRE = {
    # transformers is the numerical oracle of the tests and the peer of `hpcllm bench infer`
    "dev": ["pytest>=7,<9", "pytest-timeout>=2.1", "pytest-xdist>=3.5", "transformers>=4.40", "tensorboard>=2.14"],
    # metrics.tensorboard: true writes TensorBoard event files through it
    "tensorboard": ["tensorboard>=2.14"],
    "bench": ["transformers>=4.40"],
    # Horovod 0.28.1 does not build against torch >= 2.1 from PyPI: run scripts/build_horovod.sh
    # first (it installs a patched wheel), then this extra is already satisfied.
    "horovod": ["horovod==0.28.1"],
}

setup(
    name="hpcllm",
    version="0.1.0",
    description=__doc__.strip(),
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hpcllm", "hpcllm.*"]),
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["hpcllm = hpcllm.cli:main_exit"]},
)
