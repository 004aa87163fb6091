"""The settings a run takes where it leaves them unset: its task's own recipe, or the
default recipe for a task of its kind.

A recipe is a set of (setting, value) pairs. A task may bring its own (``task.recipe``,
SQuAD's); every other task -- the bundled ones and a user's TOML or Python task alike --
takes ``DEFAULT_RECIPES`` for its kind. Both train the template tail (the input vectors of
the prompt's closing words, ``zoobj.model.template``) with a z-scored population of 8:

- the tail's lr and eps are in units of its own vectors' RMS, so a step moves the tail
  by the same fraction of its size on any model (Gemma-3-270M's tail vectors have RMS
  1.03, SmolLM2-135M's about 0.1); what the model makes of that move differs, so for
  classification ``scale auto`` multiplies both by the smallest factor at which a probe
  moves the loss as much, against its spread over batches, as Gemma's does at 1
  (``zoobj.engine.calibrate.calibrate_scale``; never below 1);
- z-scored losses make lr a step length per unit of noise whatever the loss's scale,
  so the cross-entropy and the metric arms of ``zoobj compare`` share one lr and eps;
- the tail shifts every candidate's score at once: it can move a classification task
  whose zero-shot model puts every row in one class, and with ``smooth`` (the expected
  metric under softmax(scores / T), metric objective only) the losses of such a start
  differ from probe to probe instead of tying.

Where a task's prompts do not end with words of the template (COPA's end with "so" or
"because", by row), there is no tail to train: ``NO_TAIL`` trains a prefix instead
(Li & Liang 2021; the paper's lr and eps for it) with the same population.
"""

from __future__ import annotations

POPULATION = (("n", 8), ("shaping", "zscore"))
DEFAULT_RECIPES = {
    "classification": (("peft", "template"), *POPULATION, ("steps", 40), ("batch_size", 16), ("smooth", 1.0),
                       ("scale", "auto")),
    "generation": (("peft", "template"), *POPULATION, ("steps", 20), ("batch_size", 16),
                   ("train_max_new_tokens", 16)),
}
NO_TAIL = {
    "classification": (("peft", "prefix"), *POPULATION, ("steps", 40), ("batch_size", 16), ("smooth", 1.0),
                       ("scale", "auto")),
    "generation": (("peft", "prefix"), *POPULATION, ("steps", 20), ("batch_size", 16), ("train_max_new_tokens", 16)),
}
KEYS = ("peft", "n", "shaping", "lr", "eps", "steps", "batch_size", "train_max_new_tokens", "smooth", "scale")


TASK, DEFAULT, NO_TAIL_SAID = "task", "default", "no template tail"


def said(source: str | None) -> str:
    """A recipe's source (``recipe_for``, config.json ``recipe``) as the start line says it.

    >>> said("task"), said("default classification"), said("default generation, no template tail"), said(None)
    ("the task's recipe", 'the default recipe', 'the default recipe (no template tail: a prefix)', '')
    """
    if source == TASK:
        return "the task's recipe"
    if source and source.startswith(DEFAULT):
        return "the default recipe" + (" (no template tail: a prefix)" if source.endswith(NO_TAIL_SAID) else "")
    return ""


def recipe_for(task, data: str | None = None) -> tuple[str | None, dict]:
    """Which recipe a run of ``task`` takes and its settings: ``("task", ...)`` for the
    task's own, ``("default <kind>", ...)`` or ``("default <kind>, no template tail", ...)``,
    or ``(None, {})`` where there is none (a kind without a default)."""
    own = tuple(getattr(task, "recipe", ()) or ())
    if own:
        return TASK, dict(own)
    kind = getattr(task, "kind", None)
    if kind not in DEFAULT_RECIPES or not DEFAULT_RECIPES[kind]:
        return None, {}
    from zoobj.model.template import ends_with_template

    if ends_with_template(task, task.load("train", data)):
        return f"{DEFAULT} {kind}", dict(DEFAULT_RECIPES[kind])
    return f"{DEFAULT} {kind}, {NO_TAIL_SAID}", dict(NO_TAIL[kind])
