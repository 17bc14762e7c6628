"""Loading tokenizers and processor files from local folders, never from the Hub unless asked.

`transformers.AutoTokenizer.from_pretrained("some/typo")` turns a path that does not
exist into a Hub request: a minute of retries offline, then a traceback that does not
say the folder was missing. Here a path that is not a local folder is a
`FileNotFoundError` naming it, before transformers is called, unless `allow_hub`.
"""

from __future__ import annotations

import os


def require_local_folder(path: str, what: str, *, allow_hub: bool = False) -> bool:
  """True when `path` is a local folder; raises FileNotFoundError naming it when it is not and the Hub is not
  allowed; False when the Hub is allowed (then `path` may be a repo id)."""
  if path and os.path.isdir(path):
    return True
  if allow_hub and path:
    return False
  state = "exists but is not a folder" if path and os.path.exists(path) else "does not exist"
  raise FileNotFoundError(f"{what} {path!r} is not a local folder ({state}); the Hugging Face Hub is not "
                          "used unless allowed, so download it first (e.g. `hf download REPO --local-dir DIR`) "
                          "and pass the folder")


def load_tokenizer(path: str, allow_hub: bool = False):
  """`transformers.AutoTokenizer` from the folder `path` (`local_files_only` unless `allow_hub`).

  Raises FileNotFoundError naming `path` when it is not a local folder and the Hub is
  not allowed; no network request is made then.
  """
  local = require_local_folder(path, "tokenizer path", allow_hub=allow_hub)
  import transformers  # pylint: disable=import-outside-toplevel
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=local)
