"""Evaluation on LLaVA's benchmark suite in the reference's layout, scored as the reference scores it."""

from llava_jax.eval.inputs import EvalInputError
from llava_jax.eval.runner import evaluate, format_table, generate_answers, merge_answers, read_answers
from llava_jax.eval.tasks import TASKS, Question, Task, answer_key, get_task

__all__ = ["TASKS", "EvalInputError", "Question", "Task", "answer_key", "evaluate", "format_table", "generate_answers",
           "get_task", "merge_answers", "read_answers"]
