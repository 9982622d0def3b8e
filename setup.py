"""Build and install corp.

Install with ``pip install --no-build-isolation -e .`` so that the build uses
the torch already installed in the environment (see README).
"""
from setuptools import find_packages, setup

setup(
    name="corp-prune",
    version="0.1.0",
    description="One-shot, label-free structured pruning of Vision Transformers with closed-form compensation (CORP)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["corp", "corp.*"]),
    install_requires=["torch>=2.4", "timm>=1.0.15", "safetensors>=0.4", "tqdm>=4.60"],
    extras_require={
        "demo": ["scikit-learn>=1.3"],
        "plot": ["matplotlib>=3.7"],
        "dev": ["scikit-learn>=1.3", "pytest>=8", "pytest-benchmark>=4", "pybind11>=2.12", "ninja", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["corp=corp.cli:main"]},
)
