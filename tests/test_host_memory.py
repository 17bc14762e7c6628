"""`llava_jax.host_memory.keep_freed_memory`: a freed block comes back without page faults, on any thread."""

import os
import subprocess
import sys

import pytest

# In a fresh process (the settings must precede the threads): malloc 256 MiB, touch it, free it, then the same on a
# new thread; print the page faults the second touch cost.
SCRIPT = """
import ctypes, ctypes.util, resource, sys, threading
if sys.argv[1] == "keep":
    from llava_jax.host_memory import keep_freed_memory
    assert keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
SIZE = 256 << 20
def touch():
    p = libc.malloc(SIZE)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    ctypes.memset(p, 1, SIZE)
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    libc.free(p)
    return faults
touch()
out = []
worker = threading.Thread(target=lambda: out.append(touch()))
worker.start(); worker.join()
print(out[0])
"""


def faults_on_reuse(mode: str) -> int:
  run = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  return int(run.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
  pages = (256 << 20) // 4096
  assert faults_on_reuse("default") > pages // 2  # glibc returned the block: touching it again faults it in
  assert faults_on_reuse("keep") < pages // 100


def test_only_a_process_entry_sets_the_allocator(monkeypatch):
  """`llava-jax train` as its own process keeps freed memory; `train.cli.main(argv)` called from a host process (a
  notebook, this test run) leaves that process's malloc alone."""
  from llava_jax import cli as top_cli
  from llava_jax import host_memory
  from llava_jax.train import cli as train_cli
  from llava_jax.train import loop

  import train_util

  calls = []
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # the entry adds cpu_defaults' flags: undone after
  monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(True) or True)
  monkeypatch.setattr(loop, "train", lambda config, workdir: {"exit_code": 0})
  args = ["--config", train_util.TINY + ":stage1", "--workdir", "unused"]
  assert train_cli.main(args) == 0 and top_cli.main(["train", *args]) == 0
  assert not calls
  monkeypatch.setattr(sys, "argv", ["llava-jax", "train", *args])
  assert top_cli.main() == 0
  assert calls == [True]
