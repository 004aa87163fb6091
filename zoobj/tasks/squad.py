"""SQuAD v1.1 as generation: the model writes the answer after "Answer:" (MeZO App. E)."""

from __future__ import annotations

from zoobj.tasks.generation import GenerationTask
from zoobj.tasks.sources import Hub, shipped
from zoobj.tasks.templates import text


def squad_prompt(row: dict) -> str:
    # Titles are Wikipedia page names with underscores ("Nikola_Tesla"), in the shipped
    # files as on the Hub; they are written with spaces here. MeZO's official template
    # passes the title through unchanged.
    title = text(row, "title").replace("_", " ")
    return f"Title: {title}\nContext: {text(row, 'context')}\nQuestion: {text(row, 'question')}\nAnswer:"


def _from_hub(row: dict, index: int) -> dict:
    answers = row["answers"]
    return {"id": row["id"], "title": row["title"], "context": row["context"], "question": row["question"],
            "answers": list(answers["text"]), "answer_start": list(answers["answer_start"])}


SQUAD = GenerationTask(
    name="squad",
    template=squad_prompt,
    source=shipped("squad", hub=Hub("rajpurkar/squad", convert=_from_hub)),
    metric="f1",
    max_new_tokens=50,
    description="SQuAD v1.1 extractive QA as generation; token F1 against all gold answers",
    # the template tail ("\nAnswer:") with a population of 8 z-scored directions: the README's SQuAD
    # results; 20 steps (about 40 s each on 2 CPU cores, the step's 16 probes run together) keep the no-flag
    # run within 20 minutes there, zero-shot and final evaluations included
    recipe=(("peft", "template"), ("n", 8), ("shaping", "zscore"), ("lr", 0.2), ("eps", 0.2),
            ("steps", 20), ("batch_size", 16), ("train_max_new_tokens", 16)),
)
