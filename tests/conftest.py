"""Test set-up: 8 fake CPU devices for JAX (before it is imported), fp32 matmuls, and the fixtures that several
modules build identically (a module that needs another tokenizer defines its own under the same name)."""

import gc
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: heavier tests, run in CI only when the budget allows")


@pytest.fixture(scope="module", autouse=True)
def fresh_compiled_state():
  """Each test module starts without the executables earlier modules compiled (jax's caches cleared, their
  objects collected). Every XLA:CPU executable holds a few memory mappings until it is freed; a session that keeps
  them all reaches the kernel's vm.max_map_count (65,530), where the compiler's mmap fails and the process
  segfaults (docs/DESIGN_NOTES.md, "The test session starts each module afresh")."""
  yield
  gc.collect()
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
  """The tiny LLaMA-style tokenizer `build_tokenizer` trains (600 ids, byte fallback): offline, no Hub."""
  from llava_jax.data import synthetic  # pylint: disable=import-outside-toplevel

  return synthetic.build_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
  """That tokenizer loaded, padding with <unk> as the trainer does."""
  import transformers  # pylint: disable=import-outside-toplevel

  tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  tok.pad_token = tok.unk_token
  return tok
