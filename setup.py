"""quantnoise: Quant-Noise (Fan et al. 2020) training wrappers, iPQ export and a fairseq plugin."""
from setuptools import find_packages, setup

setup(
    name="quantnoise",
    version="0.1.0",
    description="Quant-Noise training for PyTorch and fairseq: block-wise quantization noise, iPQ, compressed export",
    packages=find_packages(include=["quantnoise", "quantnoise.*"]),
    package_data={"quantnoise": ["py.typed"], "quantnoise.runtime": ["csrc/*.cpp"]},
    python_requires=">=3.10",
    # Pins mirror scripts/requirements.txt.  fairseq is deliberately not listed: it is built by
    # scripts/setup_venv.sh as fairseq-fixed==0.12.3.1 with --no-deps (see README), and only the
    # plugin subpackage quantnoise/qn_fairseq imports it.
    install_requires=[
        "torch==2.13.0",
        "numpy==1.26.4",
        "hydra-core==1.3.2",
        "omegaconf==2.3.0",
        "faiss-cpu==1.15.1",
        "safetensors==0.8.0",
        "tqdm==4.67.1",
    ],
    extras_require={"fairseq": ["fairseq-fixed==0.12.3.1"]},
    entry_points={"console_scripts": ["quantnoise=quantnoise.cli:main"]},
)
