"""A Gradio chat page like LLaVA's demo (`llava/serve/gradio_web_server.py`): image upload, chat history,
temperature / top-p / max-output-tokens controls, regenerate and clear. Replies stream from the same batching
engine as the API, so several browser tabs share decode steps.
"""

from __future__ import annotations

import logging

from llava_jax.serve.chat import Conversation, build_request, check_image_size, check_text_length
from llava_jax.serve.engine import BadRequest, Delta, Failed, Finished, QueueEvents, QueueFull

log = logging.getLogger("llava_jax.serve")

TITLE = "LLaVA (llava-jax)"


def reply_stream(served, turns: list[str], image, temperature: float, top_p: float, max_tokens: int):
  """Yields the growing assistant reply to `turns` (alternating, ending with the user's); errors become text."""
  try:
    check_text_length(turns, served.max_prompt_chars)  # the API's limits, before tokenizing and padding
    if image is not None:
      check_image_size(image.size, "the image", served.processor)
    request = build_request(served.processor, Conversation(list(turns), None, [image] if image is not None else []),
                            max_images=served.max_images, max_tiles=served.max_tiles, max_tokens=int(max_tokens),
                            temperature=float(temperature), top_p=float(top_p), seed=0, stop=())
    events = QueueEvents()
    handle = served.engine.submit(request, events)
  except (BadRequest, QueueFull) as e:
    yield f"[error: {e}]"
    return
  text = ""
  try:
    for event in events:
      if isinstance(event, Delta):
        text += event.text
        yield text
      elif isinstance(event, Finished):
        yield event.text
      elif isinstance(event, Failed):
        yield text + f"[error: {event.message}]"
  finally:
    handle.cancel()  # the page was closed or the event cancelled: free the row


def _display(turns: list[str], image) -> list[dict]:
  messages = []
  for i, text in enumerate(turns):
    if i == 0 and image is not None:
      text = "[image] " + text
    messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
  return messages


def create_blocks(served):
  """The page. Its state per browser session: the turns so far (user, assistant, ...)."""
  import gradio as gr

  def ask(question, image, turns, temperature, top_p, max_tokens):
    question = (question or "").strip()
    if not question:
      yield gr.update(), turns, _display(turns, image)
      return
    turns = list(turns) + [question]
    yield "", turns, _display(turns + [""], image)
    reply = ""
    for reply in reply_stream(served, turns, image, temperature, top_p, max_tokens):
      yield "", turns, _display(turns + [reply], image)
    turns = turns + [reply]
    yield "", turns, _display(turns, image)

  def regenerate(image, turns, temperature, top_p, max_tokens):
    if len(turns) < 2:
      yield turns, _display(turns, image)
      return
    turns = list(turns[:-1])
    reply = ""
    for reply in reply_stream(served, turns, image, temperature, top_p, max_tokens):
      yield turns, _display(turns + [reply], image)
    turns = turns + [reply]
    yield turns, _display(turns, image)

  def clear():
    return [], [], None, ""

  with gr.Blocks(title=TITLE, analytics_enabled=False) as blocks:
    gr.Markdown(f"# {TITLE}\nModel: `{served.model_name}`. Upload an image and ask about it.")
    turns = gr.State([])
    with gr.Row():
      with gr.Column(scale=3):
        image = gr.Image(type="pil", label="Image", elem_id="image", sources=["upload"])
        with gr.Accordion("Parameters", open=True):
          temperature = gr.Slider(0.0, 1.0, value=0.2, step=0.1, label="Temperature", elem_id="temperature")
          top_p = gr.Slider(0.0, 1.0, value=0.7, step=0.1, label="Top P", elem_id="top_p")
          max_tokens = gr.Slider(1, served.max_tokens, value=min(512, served.max_tokens), step=1,
                                 label="Max output tokens", elem_id="max_tokens")
      with gr.Column(scale=8):
        chatbot = gr.Chatbot(label="LLaVA", elem_id="chatbot", height=520)
        with gr.Row():
          question = gr.Textbox(show_label=False, placeholder="Enter text and press ENTER", elem_id="question",
                                scale=8)
          send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
        with gr.Row():
          regenerate_button = gr.Button("Regenerate", elem_id="regenerate")
          clear_button = gr.Button("Clear", elem_id="clear")
    controls = [temperature, top_p, max_tokens]
    for trigger in (send.click, question.submit):
      trigger(ask, [question, image, turns] + controls, [question, turns, chatbot], concurrency_limit=None)
    regenerate_button.click(regenerate, [image, turns] + controls, [turns, chatbot], concurrency_limit=None)
    clear_button.click(clear, None, [turns, chatbot, image, question])
  return blocks


def create_web_app(served):
  """A FastAPI app with the page at / and the engine's /health and /metrics beside it."""
  import gradio as gr
  from fastapi import FastAPI

  app = FastAPI(title=TITLE)

  @app.get("/health")
  def health():
    return {"status": "ok" if served.engine.thread.is_alive() else "engine stopped"}

  @app.get("/metrics")
  def metrics():
    return served.engine.metrics()

  return gr.mount_gradio_app(app, create_blocks(served).queue(default_concurrency_limit=None), path="/",
                             ssr_mode=False)
