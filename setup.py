from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="llama",
    version="0.1.0",
    description="Llama 3 inference: Meta's checkpoints on any number of processes, CPU or GPU",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["llama", "llama.*"]),
    package_data={"llama": ["chat.html"]},
    python_requires=">=3.10",
    install_requires=Path(__file__).with_name("requirements.txt").read_text().split(),
    entry_points={"console_scripts": ["llama = llama.cli:main"]},
    extras_require={
        "test": [
            "pytest>=7", "hypothesis>=6", "pexpect>=4.8", "transformers>=4.45", "llama-models>=0.3", "matplotlib>=3.5",
            "openai>=1.40", "selenium>=4.10",
        ],
        "bench": ["transformers>=4.45", "llama-models>=0.3", "matplotlib>=3.5", "openai>=1.40"],
    },
)
