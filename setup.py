"""Install p4q-engine. ``kernels/`` ships as ``p4q_engine.kernels`` (no top-level ``kernels`` module)."""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

packages = find_packages(include=["p4q_engine", "p4q_engine.*"]) + ["p4q_engine.kernels"]

# The C++ bit packer: plain pybind11 over numpy buffers (no torch headers, no CUDA), so it builds in seconds.
ext_modules = [
    Pybind11Extension(
        "p4q_engine._bitpack",
        ["csrc/bitpack.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
        extra_link_args=["-pthread"],
    )
]

setup(
    name="p4q-engine",
    version="0.1.0",
    description="P4Q low-bit CLIP: fake-quant PTQ reference, P4Q prompt training, packed int2/3/4/8 artifacts, "
    "Triton integer kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"p4q_engine.kernels": "kernels"},
    # kernels/tuned: the per-GPU tile tables loaded before any autotuning (kernels/tuning.py)
    package_data={"p4q_engine": ["assets/*", "assets/model_configs/*"], "p4q_engine.kernels": ["tuned/*.json"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "triton; platform_system == 'Linux'",
        "open_clip_torch>=2.26",
        "numpy",
        "pybind11>=2.12",
        "safetensors>=0.4",
        "pillow",
        "tqdm",
        "matplotlib",
        "pytest>=8",
        "pytest-benchmark>=4",
        "hypothesis>=6",
        "ruff>=0.8",  # lint + format check, run by .ci/run (its version is pinned in requirements.lock)
        # p4q serve: ASGI app + server, multipart bodies, metrics; httpx for its tests and benchmarks/serve_load.py
        "starlette>=0.40",
        "uvicorn>=0.30",
        "python-multipart>=0.0.18",
        "prometheus-client>=0.20",
        "httpx>=0.27",
        "pydantic>=2.5,<3",  # the .p4q manifest schema (p4q_engine/artifact/schema.py)
    ],
    extras_require={
        # p4q serve --backend ray and p4q classify --ray (p4q_engine/serve/ray_backend.py, p4q_engine/batch/): Ray
        # Serve replicas and Ray Data pipelines; optional so the core install stays lean. pyarrow: the Parquet files
        # of `p4q classify --output` (also the local path's writer).
        "ray": ["ray[serve,data]>=2.40", "pyarrow>=14"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    entry_points={"console_scripts": ["p4q=p4q_engine.cli:main"]},
)
