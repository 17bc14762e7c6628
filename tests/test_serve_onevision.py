"""`llava-jax serve` on a tiny LLaVA-OneVision checkpoint: the official openai client sends several images in one
conversation (in one user message, and across turns) and gets `llava_jax.generate`'s greedy reply for the prompt
with one "<image>" per image, in order, each of several read as its base tile only; one image alone is tiled in
full."""

import jax.numpy as jnp
import numpy as np
import openai
import pytest

import hf_tiny
import serve_tiny
from llava_jax import generate, load_hf_checkpoint
from llava_jax.decoding import stop_at
from llava_jax.processor import Processor
from llava_jax.serve import serve_model
from llava_jax.serve.api import create_app

MAX_TOKENS = 12
TEMPLATE = "chatml_direct"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  model = load_hf_checkpoint(hf_tiny.onevision_directory(tmp_path_factory.mktemp("ov_serve")))
  proc = Processor.from_model(model, template=TEMPLATE)
  served = serve_model(model, proc, max_batch=2, max_tokens=32, model_name="tiny-ov")
  with serve_tiny.Server(create_app(served)) as url:
    yield {"client": openai.OpenAI(base_url=url + "/v1", api_key="none"), "model": model, "proc": proc,
           "served": served}
  served.engine.close()


def greedy(setup, prompt, images) -> str:
  """`llava_jax.generate`'s reply: cut at EOS, decoded, cut at the template's stop string."""
  proc, model = setup["proc"], setup["model"]
  inputs = proc([prompt], images)
  if len(images) > 1:
    assert inputs["image_base_only"].all() and inputs["pixel_values"].shape[1] == 1
  eos = proc.tokenizer.eos_token_id
  row = generate(model, inputs["input_ids"], jnp.asarray(inputs["pixel_values"]), inputs["attention_mask"],
                 image_sizes=inputs["image_sizes"], max_new_tokens=MAX_TOKENS, eos_token_id=eos)[0]
  cut = np.flatnonzero(row == eos)
  return stop_at(proc.decode(row[:cut[0]] if len(cut) else row), [proc.template.stop_str])[0]


def image_part(im):
  return {"type": "image_url", "image_url": {"url": serve_tiny.data_uri(im)}}


def ask(setup, messages) -> str:
  reply = setup["client"].chat.completions.create(model="tiny-ov", messages=messages, max_tokens=MAX_TOKENS,
                                                  temperature=0)
  return reply.choices[0].message.content


IMAGES = [serve_tiny.image(1, (60, 90)), serve_tiny.image(2, (120, 50))]


def test_two_images_in_one_message(setup):
  got = ask(setup, [{"role": "user", "content": [image_part(IMAGES[0]), image_part(IMAGES[1]),
                                                 {"type": "text", "text": "What differs?"}]}])
  proc = setup["proc"]
  assert proc.prompt(["What differs?"], image=2).count("<image>") == 2
  expected = greedy(setup, proc.prompt(["What differs?"], image=2), IMAGES)
  assert expected.strip() and got == expected  # something to compare: not an empty reply


def test_images_across_turns_keep_their_turns(setup):
  messages = [{"role": "user", "content": [{"type": "text", "text": "Look."}, image_part(IMAGES[0])]},
              {"role": "assistant", "content": "Seen."},
              {"role": "user", "content": [image_part(IMAGES[1]), {"type": "text", "text": "And this one?"}]}]
  prompt = setup["proc"].template.generation_prompt(["<image>\nLook.", "Seen.", "<image>\nAnd this one?"])
  assert ask(setup, messages) == greedy(setup, prompt, IMAGES)


def test_one_image_is_tiled_in_full(setup):
  got = ask(setup, [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image_part(IMAGES[1])]}])
  proc = setup["proc"]
  inputs = proc([proc.prompt(["What is it?"], image=True)], [IMAGES[1]])
  assert not inputs["image_base_only"].any() and proc.anyres.num_tiles((50, 120)) > 1
  assert got == greedy(setup, proc.prompt(["What is it?"], image=True), [IMAGES[1]])


def test_image_limit_is_what_the_context_holds(setup):
  served, proc = setup["served"], setup["proc"]
  per_image = proc.anyres.tile_features + 1
  assert served.max_images == min(served.engine.max_len, served.engine.context) // per_image > 2
  too_many = [image_part(IMAGES[0])] * (served.max_images + 1) + [{"type": "text", "text": "Hi"}]
  with pytest.raises(openai.BadRequestError, match="images given"):
    ask(setup, [{"role": "user", "content": too_many}])
