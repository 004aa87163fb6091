"""SuperGLUE tasks with MeZO's prompts (App. E; official large_models/templates.py).

RTE, CB and WiC prompts end with a newline and the answer word follows it directly;
COPA's prompt is the premise (final period dropped) and a connective, and the two
alternatives are the candidates. Text fields are stripped before templating.
"""

from __future__ import annotations

from dataclasses import dataclass

from zoobj.errors import DataError
from zoobj.tasks.classification import ClassificationTask
from zoobj.tasks.sources import Hub, shipped
from zoobj.tasks.templates import text


@dataclass(frozen=True)
class Relabel:
    """Hub rows -> shipped rows: the Hub's class id becomes the shipped label value."""

    values: tuple

    def __call__(self, row: dict, index: int) -> dict:
        return {**row, "label": self.values[row["label"]]}


def superglue(config: str, values: tuple | None = None) -> Hub:
    return Hub("aps/super_glue", config, convert=Relabel(values) if values else None)


def rte_prompt(row: dict) -> str:
    return f'{text(row, "premise")}\nDoes this mean that "{text(row, "hypothesis")}" is true? Yes or No?\n'


def cb_prompt(row: dict) -> str:
    return f'Suppose {text(row, "premise")} Can we infer that "{text(row, "hypothesis")}"? Yes, No, or Maybe?\n'


def boolq_prompt(row: dict) -> str:
    question = text(row, "question")
    if not question.endswith("?"):
        question += "?"
    question = question[:1].upper() + question[1:]
    return f"{text(row, 'passage')} {question}\n"


def wic_prompt(row: dict) -> str:
    return (f'Does the word "{text(row, "word")}" have the same meaning in these two sentences? Yes, No?\n'
            f'{text(row, "sentence1")}\n{text(row, "sentence2")}\n')


CONNECTIVES = {"effect": "so", "cause": "because"}


def copa_prompt(row: dict) -> str:
    """ "The smoke alarm went off." + cause -> "The smoke alarm went off because"."""
    premise, question = text(row, "premise"), row["question"]
    if question not in CONNECTIVES:
        raise DataError(f"COPA question must be 'cause' or 'effect', not {question!r}")
    return f"{premise.removesuffix('.')} {CONNECTIVES[question]}"


def copa_choices(row: dict) -> list[str]:
    """The alternatives after a space, first word lower-cased unless it is "I"."""
    return [" " + _lower_first_word(text(row, field)) for field in ("choice1", "choice2")]


def _lower_first_word(sentence: str) -> str:
    first, space, rest = sentence.partition(" ")
    return (first if first == "I" else first.lower()) + space + rest


RTE = ClassificationTask(
    name="rte",
    template=rte_prompt,
    words=("Yes", "No"),
    labels=("entailment", "not_entailment"),
    source=shipped("rte", hub=superglue("rte", ("entailment", "not_entailment"))),
    description="RTE textual entailment (SuperGLUE)",
)

CB = ClassificationTask(
    name="cb",
    template=cb_prompt,
    words=("Yes", "No", "Maybe"),
    labels=("entailment", "contradiction", "neutral"),
    source=shipped("cb", hub=superglue("cb", ("entailment", "contradiction", "neutral"))),
    description="CommitmentBank three-way entailment (SuperGLUE)",
)

# MeZO's BoolQ template for OPT (BoolQTemplateV3): the answer follows the newline.
BOOLQ = ClassificationTask(
    name="boolq",
    template=boolq_prompt,
    words=("Yes", "No"),
    labels=(True, False),
    source=shipped("boolq", hub=superglue("boolq", (False, True))),
    description="BoolQ yes/no questions (SuperGLUE); only 32 train / 32 dev rows are shipped",
)

WIC = ClassificationTask(
    name="wic",
    template=wic_prompt,
    words=("No", "Yes"),
    labels=(False, True),
    source=shipped("wic", hub=superglue("wic", (False, True))),
    description="Word-in-Context (SuperGLUE); CC BY-NC 4.0",
)

COPA = ClassificationTask(
    name="copa",
    template=copa_prompt,
    candidates=copa_choices,
    labels=(0, 1),
    source=shipped("copa", hub=superglue("copa")),
    length_normalize=True,  # the two alternatives differ in length
    description="Choice of Plausible Alternatives (SuperGLUE)",
)
