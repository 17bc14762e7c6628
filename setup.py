"""llava-jax: LLaVA in JAX/Flax. The fast-moving JAX-ecosystem libraries are pinned to the versions tested."""

from setuptools import find_packages, setup

setup(
    name="llava-jax",
    version="0.1.0",
    description="LLaVA (Large Language-and-Vision Assistant) in JAX/Flax: convert, train, serve on TPU and GPU",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["llava_jax", "llava_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "ml_collections==1.1.0",
        "grain==0.2.18",
        "transformers==5.23.0",
        "sentencepiece>=0.2",
        "protobuf",
        "safetensors>=0.4",
        "ml_dtypes>=0.5",
        "numpy>=1.26",
        "pillow>=10",
        "tqdm",
        "absl-py",
        "tensorboardX==2.6.5",
    ],
    extras_require={
        # torch is the reference implementation in tests; 2.13.0 is the CPU build (a plain `torch` pulls CUDA).
        "test": ["pytest>=8", "torch==2.13.0", "scikit-image>=0.24", "scipy", "tensorflow-datasets==4.9.10",
                 "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0",
                 # serving tests: the server's deps, the official OpenAI client, a browser driver (Debian's
                 # chromium, installed by .ci/run: playwright downloads no browser here).
                 "fastapi==0.165.0", "uvicorn==0.55.0", "gradio==6.31.0", "openai==3.60.0", "playwright==1.65.2",
                 "httpx==0.29.0"],
        # `llava-jax serve` (OpenAI-compatible API) and `llava-jax web` (Gradio chat page).
        "serve": ["fastapi==0.165.0", "uvicorn==0.55.0", "gradio==6.31.0"],
        # TFDS builders writing ArrayRecord (no TensorFlow needed).
        "tfds": ["tensorflow-datasets==4.9.10"],
    },
    entry_points={"console_scripts": ["llava-jax=llava_jax.cli:main"],
                  # lmms-eval finds external backends here (inert unless lmms-eval is installed).
                  "lmms_eval.models": ["llava_jax=llava_jax.eval.lmms_eval_adapter:manifest"]},
)
