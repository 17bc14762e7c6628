"""LLaVA data: conversation templates, tokenization with the reference's label masks,
CLIP image preprocessing, and the grain input pipeline (TFDS builders in `tfds_llava`,
imported on demand).

One module per job: `conversation` (templates), `text` (ids and labels), `image` (CLIP
pixels), `records` (record sources, skip markers), `ordering` (epoch order, length
grouping, host/worker shards), `preprocess` (record -> example), `collate` (batches),
`pipeline` (assembles them: `make_iterator`), `iterator` (skip counting, limits, state), `synthetic`
(a toy corpus and tokenizer), `anyres` (LLaVA-NeXT tiles), `layout` (which feature row
each image token takes).
"""

from llava_jax.data.conversation import TEMPLATES, SeparatorStyle, Template, get_template
from llava_jax.data.image import ImageProcessorConfig, preprocess_image, read_processor_files
from llava_jax.data.synthetic import build_tokenizer, write_shapes_corpus
from llava_jax.data.text import (IGNORE_INDEX, DataError, SkipReason, TokenizationMismatchError,
                                 encode_prompt, preprocess_conversation, tokenizer_image_token)

__all__ = [
    "IGNORE_INDEX", "TEMPLATES", "DataConfig", "DataError", "DataInterrupted", "DataIterator", "DataStallError",
    "DataStateMismatchError", "ImageProcessorConfig",
    "SeparatorStyle", "SkipReason", "Template", "TokenizationMismatchError", "build_tokenizer", "encode_prompt",
    "get_template", "make_dataset", "make_iterator", "preprocess_conversation", "preprocess_image",
    "read_processor_files", "tokenizer_image_token", "write_shapes_corpus",
]

# The grain pipeline's names load on first use: every forward pass imports `data.layout` (the image-token layout),
# and a machine that only runs the model (inference, benchmarks/gpu_check.py) need not have grain.
_PIPELINE_NAMES = ("DataConfig", "DataInterrupted", "DataIterator", "DataStallError", "DataStateMismatchError",
                   "make_dataset", "make_iterator")


def __getattr__(name):
  if name in _PIPELINE_NAMES:
    from llava_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    return getattr(pipeline, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
