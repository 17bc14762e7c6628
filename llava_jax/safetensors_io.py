"""Streaming safetensors reading and writing, one tensor at a time.

Our own small reader (the format is an 8-byte header length, a JSON header, raw little-endian bytes) so that:
bf16 comes back as `ml_dtypes.bfloat16` without torch; each tensor is read with a plain file read into a fresh
array (no mmap pages lingering in RSS, so converting a 13B model needs about one copy of it in memory); and a
truncated or corrupt file is reported by name before anything is converted.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointFileError(ValueError):
  """A safetensors file or index that cannot be read as it claims to be."""


def _read_header(path: str) -> tuple[dict, int]:
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointFileError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise CheckpointFileError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise CheckpointFileError(f"{path}: corrupt safetensors header ({e})") from None
  header.pop("__metadata__", None)
  data_start = 8 + n
  for name, info in header.items():
    begin, end = info["data_offsets"]
    if info["dtype"] not in DTYPES:
      raise CheckpointFileError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    expected = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(DTYPES[info["dtype"]]).itemsize
    if end - begin != expected:
      raise CheckpointFileError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape needs {expected}")
    if data_start + end > size:
      raise CheckpointFileError(
          f"{path}: truncated safetensors file: tensor {name!r} ends at byte {data_start + end}, the file has {size}")
  return header, data_start


class SafetensorsReader:
  """Reads a checkpoint directory (single file or sharded with an index) or one .safetensors file lazily.

  All headers are read and validated on construction; tensors are read on `get`.
  """

  def __init__(self, path: str | os.PathLike):
    path = os.fspath(path)
    if os.path.isdir(path):
      index = os.path.join(path, INDEX_NAME)
      if os.path.exists(index):
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
      elif os.path.exists(os.path.join(path, SINGLE_NAME)):
        files = [SINGLE_NAME]
      else:
        files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if not files:
          bins = [n for n in os.listdir(path) if n.endswith(".bin")]
          hint = f" (found {bins}: pytorch .bin files; convert them to safetensors first)" if bins else ""
          raise FileNotFoundError(f"no .safetensors files in {path}{hint}")
      files = [os.path.join(path, n) for n in files]
    else:
      files = [path]
    self.location: dict[str, tuple[str, dict, int]] = {}
    for file in files:
      if not os.path.exists(file):
        raise CheckpointFileError(f"{file} is listed in the index but does not exist")
      header, start = _read_header(file)
      for name, info in header.items():
        self.location[name] = (file, info, start)

  def keys(self) -> list[str]:
    return list(self.location)

  def __contains__(self, key) -> bool:
    return key in self.location

  def shape(self, key) -> tuple[int, ...]:
    return tuple(self.location[key][1]["shape"])

  def dtype(self, key) -> np.dtype:
    return np.dtype(DTYPES[self.location[key][1]["dtype"]])

  def get(self, key) -> np.ndarray:
    file, info, start = self.location[key]
    begin, end = info["data_offsets"]
    out = np.empty(info["shape"], DTYPES[info["dtype"]])
    with open(file, "rb") as f:
      f.seek(start + begin)
      if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - begin:
        raise CheckpointFileError(f"{file}: short read of tensor {key!r}")
    return out


def write_safetensors(tensors: Iterator[tuple[str, np.ndarray]] | dict, out_dir: str,
                      max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes tensors as HF does: `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` plus
  `model.safetensors.index.json` when they exceed `max_shard_bytes`. Tensors are consumed one shard at a time."""
  items = tensors.items() if isinstance(tensors, dict) else tensors
  shards: list[list[tuple[str, np.ndarray]]] = [[]]
  tmp_names, total, shard_bytes = [], 0, 0

  def flush():
    tmp = os.path.join(out_dir, f".shard-{len(tmp_names):05d}.tmp")
    _write_one(tmp, shards[-1])
    tmp_names.append((tmp, [k for k, _ in shards[-1]]))
    shards[-1] = []

  for name, array in items:
    array = np.ascontiguousarray(array)
    if shard_bytes and shard_bytes + array.nbytes > max_shard_bytes:
      flush()
      shard_bytes = 0
    shards[-1].append((name, array))
    shard_bytes += array.nbytes
    total += array.nbytes
  flush()
  if len(tmp_names) == 1:
    os.replace(tmp_names[0][0], os.path.join(out_dir, SINGLE_NAME))
    return [SINGLE_NAME]
  n, weight_map, names = len(tmp_names), {}, []
  for i, (tmp, keys) in enumerate(tmp_names):
    name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    os.replace(tmp, os.path.join(out_dir, name))
    weight_map.update({k: name for k in keys})
    names.append(name)
  with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names


def _write_one(path: str, tensors: list[tuple[str, np.ndarray]]):
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, array in tensors:
    if array.dtype not in CODES:
      raise TypeError(f"cannot write tensor {name!r} of dtype {array.dtype} to safetensors")
    header[name] = {"dtype": CODES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, array in tensors:
      f.write(memoryview(array.reshape(-1).view(np.uint8)))
