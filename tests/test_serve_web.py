"""`llava-jax web`: a headless Chromium (Debian's, driven by playwright; no browser download) opens the Gradio
page, uploads an image, asks a question and reads the model's greedy answer, which must be the one
`llava_jax.generate` gives for the same prompt and image. Saves a screenshot."""

import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import serve_tiny
from llava_jax import load_checkpoint
from llava_jax import generate
from llava_jax.decoding import stop_at
from llava_jax.processor import Processor
from llava_jax.serve import serve_model

CHROMIUM = "/usr/bin/chromium"
QUESTION = "What is in the image?"
MAX_TOKENS = 12


def _words(text: str) -> list[str]:
  return re.findall(r"\w+", text)


@pytest.mark.slow  # a browser, Gradio and a model: ~25 s of CPU, over a minute on a busy machine
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_gradio_page_answers_a_question_about_an_uploaded_image(tmp_path):
  playwright = pytest.importorskip("playwright.sync_api")
  from llava_jax.serve.web import create_web_app

  ckpt = serve_tiny.make_checkpoint(tmp_path)
  model = load_checkpoint(ckpt)
  proc = Processor.from_model(model)
  image_path = tmp_path / "picture.png"
  serve_tiny.image(5, size=(48, 64)).save(image_path)

  inputs = proc(proc.prompt([QUESTION], image=True), [str(image_path)])
  tokens = generate(model, inputs["input_ids"], jnp.asarray(inputs["pixel_values"]), inputs["attention_mask"],
                    max_new_tokens=MAX_TOKENS, eos_token_id=proc.tokenizer.eos_token_id)[0]
  cut = np.flatnonzero(tokens == proc.tokenizer.eos_token_id)
  expected = stop_at(proc.decode(tokens[:cut[0]] if len(cut) else tokens), [proc.template.stop_str])[0]
  assert _words(expected), f"the tiny model's answer {expected!r} has no words to look for on the page"

  served = serve_model(model, proc, max_batch=2, max_len=192, max_tokens=MAX_TOKENS, model_name="tiny")
  try:
    with serve_tiny.Server(create_web_app(served)) as url, playwright.sync_playwright() as p:
      browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
      page = browser.new_page(viewport={"width": 1280, "height": 900})
      page.goto(url + "/", wait_until="domcontentloaded", timeout=60_000)
      page.locator("#question textarea").wait_for(timeout=60_000)
      page.locator("#image input[type=file]").set_input_files(str(image_path))
      page.locator("#image img").first.wait_for(timeout=30_000)  # the uploaded preview
      temperature = page.locator("#temperature input[type=number]")
      temperature.fill("0")  # greedy, to compare with generate
      temperature.press("Enter")
      page.locator("#question textarea").fill(QUESTION)
      page.locator("#send").click()
      chatbot = page.locator("#chatbot")
      want = " ".join(_words(expected))
      page.wait_for_function(
          """([want]) => {
               const el = document.querySelector('#chatbot');
               const words = (el ? el.innerText : '').match(/\\w+/g) || [];
               return words.join(' ').includes(want);
             }""", arg=[want], timeout=60_000)
      text = chatbot.inner_text()
      page.screenshot(path=str(tmp_path / "web.png"), full_page=True)
      shutil.copy(tmp_path / "web.png", "/tmp/web_screenshot.png")
      browser.close()
  finally:
    served.engine.close()
  assert QUESTION in text
  assert want in " ".join(_words(text))
  metrics = served.engine.metrics()
  assert metrics["completed"] == 1 and metrics["failed"] == 0
