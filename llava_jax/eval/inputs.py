"""What evaluation reads from files it is handed: the one JSONL reader (question files, annotation lines, answers
files, the resume parts), the JSON reader, and the rule for image paths named by a question file.

Why one reader: a bad line used to surface as a bare `json` message ("line 1 column 79") or a `KeyError`
('question_id') naming neither the file nor the line. Here every such problem is an `EvalInputError` saying
`FILE:LINE: what is wrong`. The only line forgiven is the last one of our own answers files when it was cut short
(no newline, not JSON): a run killed mid-write leaves one, and that question is answered again (logged).
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger("llava_jax.eval")

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object",
               bool: "true or false", type(None): "null"}


class EvalInputError(ValueError):
  """A question, annotation or answers file that cannot be used as it is; the message names file and line."""


def _type_name(value_or_type) -> str:
  kind = value_or_type if isinstance(value_or_type, type) else type(value_or_type)
  return _TYPE_NAMES.get(kind, kind.__name__)


def check_fields(record, fields: dict | None, where: str):
  """`record` must be a JSON object holding each of `fields` ({name: type, tuple of types, or None for any})."""
  if not isinstance(record, dict):
    raise EvalInputError(f"{where}: expected a JSON object, got {_type_name(record)}")
  for name, kind in (fields or {}).items():
    if name not in record:
      raise EvalInputError(f"{where}: missing field {name!r} (each line needs {', '.join(fields)})")
    value = record[name]
    kinds = kind if isinstance(kind, tuple) else (kind,) if kind is not None else ()
    if kinds and (isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds)):
      expected = " or ".join(_type_name(k) for k in kinds)
      raise EvalInputError(f"{where}: field {name!r} is {_type_name(value)} ({json.dumps(value)[:40]}), expected "
                           f"{expected}")


def _parse(raw: bytes, where: str, name_line: bool = False):
  """JSON of `raw`; an error names `where` (with `name_line`, also the line of a whole file that is wrong)."""
  try:
    return json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise EvalInputError(f"{where}: not UTF-8 text (byte {e.start + 1})") from None
  except json.JSONDecodeError as e:
    line = f":{e.lineno}" if name_line else ""
    raise EvalInputError(f"{where}{line}: not valid JSON (column {e.colno}: {e.msg})") from None


def is_torn(raw: bytes) -> bool:
  """A final line that a kill cut short: no newline after it and not whole JSON."""
  if raw.endswith(b"\n"):
    return False
  try:
    json.loads(raw.decode("utf-8"))
    return False
  except ValueError:  # JSONDecodeError and UnicodeDecodeError
    return True


def read_jsonl(path: str, fields: dict | None = None, *, torn_tail_ok: bool = False) -> list[dict]:
  """The records of a JSONL file, each checked to hold `fields` (see `check_fields`); blank lines are skipped.
  `torn_tail_ok` (our own answers files only): a cut-short last line is dropped with a warning instead of being
  an error."""
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  last = len(lines)  # 1-based number of the final line; "" after a trailing newline
  out = []
  for number, raw in enumerate(lines, 1):
    if not raw.strip():
      continue
    if torn_tail_ok and number == last and is_torn(raw):
      log.warning("%s:%d: a line cut short (a killed run?) is dropped; its question is answered again", path, number)
      continue
    record = _parse(raw, f"{path}:{number}")
    check_fields(record, fields, f"{path}:{number}")
    out.append(record)
  return out


def read_json(path: str):
  """A whole JSON file; bad JSON names the file and line."""
  with open(path, "rb") as f:
    return _parse(f.read(), path, name_line=True)


def image_path(root: str, name) -> tuple[str, str | None]:
  """(the file a question's `image` names under `root`, None) or (that path as named, why it is refused).

  Why: a question file is data, not configuration; it may name only files inside the task's image folder. An
  absolute path, a `..` that climbs out, or a symlink whose target lies outside is refused. The folder itself may
  be a link (the demo links its images folder), so containment is checked against the folder's own target."""
  if not isinstance(name, str) or not name.strip():
    return str(name), f"image {name!r} is not a file name"
  if os.path.isabs(name) or os.path.splitdrive(name)[0]:
    return name, f"image {name!r} is an absolute path; image paths are relative to {root}"
  normal = os.path.normpath(name)
  path = os.path.join(root, normal)  # the file checked is the file opened
  if normal == os.pardir or normal.startswith(os.pardir + os.sep):
    return path, f"image {name!r} climbs out of {root}"
  try:
    real_root, real = os.path.realpath(root), os.path.realpath(path)
  except (OSError, ValueError) as e:  # a NUL byte, a link loop on some platforms
    return path, f"image {name!r} cannot be resolved ({e})"
  if os.path.commonpath([real_root, real]) != real_root:
    return path, f"image {name!r} resolves to {real}, outside {root} (a symlink out of it)"
  return path, None
