"""The main job (README's first command) learns from its own data: at least 90% of the held-out questions.

Measured with the defaults (seed 0): 97.5% of 200 questions (colour and background 100%, shape 93%; chance about
20% on shapes); seed 1: 94.5%. The target is 90% overall.
"""

import pytest

from llava_jax import demo


@pytest.mark.slow
def test_main_job_answers_held_out_questions(tmp_path):
  result = demo.run(str(tmp_path / "demo"))
  assert result["accuracy"] >= 0.9, result
  assert min(result["colour"], result["background"]) >= 0.9 and result["shape"] >= 0.6, result
