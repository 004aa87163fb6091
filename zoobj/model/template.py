"""``--peft template``: train the input vectors of the prompt's closing words.

A prompt such as SQuAD's ``Title: ...\\nContext: ...\\nQuestion: ...\\nAnswer:`` ends
with a few tokens that every prompt of the task shares and that no row writes: the
template's tail (``\\n``, ``Answer``, ``:`` for SQuAD). They sit right where the model
decides *what kind of answer* comes next, so their input vectors are a small, strong
handle on the answer's form (Gemma-3-270M: 3 tokens, 1,920 numbers). This is prompt
tuning (Lester et al. 2021) with two choices made for zeroth-order training:

- the soft tokens start as the template's own, so step 0 is exactly the zero-shot
  model, and a population of perturbations searches thousands of dimensions, not
  millions;
- they sit at the *end* of the prompt, not the start: everything before them is the
  same for every perturbation (causal attention), so a probe runs only the tail and
  the answer over keys and values computed once (``zoobj.model.tail_probes.PromptBodyStore``).

The trained tensor ``delta`` (one row per tail token) is added to the embeddings of
the last k tokens of each prompt, where they are the tail (``TemplateTail.placed``);
the row's own text, a scored target, generated tokens and the output head are untouched.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch

from zoobj.errors import ConfigError, ModelError

SENTINEL = "x"  # stands for every text field when the template is rendered alone
SAMPLE = 16  # training rows whose prompts must all end with the tail
FILE = "zoobj_template.json"  # what an exported template-tuned model adds to its folder


AT_END = "end"  # where the prompt ends when no caller said: at the end of a forward of more than one token


class TemplateTail(torch.nn.Module):
    """The model's input embedding, plus a trained row added at each tail token at the
    end of the prompt -- and nowhere else: not where the row's own text holds the same
    tokens, not on a target scored after the prompt, not on generated tokens.

    Where the prompt ends in a forward's input is said by the caller (``placed``): an
    end column per row, or None for an input that holds no prompt end (a decoding step,
    a continuation). Unsaid, a forward of more than one token is a prompt's (it ends at
    the input's last column, left padding) and a one-token forward is a decoding step."""

    def __init__(self, base: torch.nn.Module, tail: list[int]) -> None:
        super().__init__()
        if not tail:
            raise ConfigError("--peft template: the template has no closing tokens of its own to train")
        self.base = base
        weight = base.weight
        self.register_buffer("tail", torch.tensor(tail, dtype=torch.long, device=weight.device), persistent=False)
        self.delta = torch.nn.Parameter(torch.zeros(len(tail), weight.shape[1], dtype=weight.dtype,
                                                    device=weight.device))
        self._rows: torch.Tensor | None = None  # per-row deltas while ``per_row`` is open
        self._ends = AT_END  # per-row prompt ends while ``placed`` is open

    @contextlib.contextmanager
    def per_row(self, deltas: torch.Tensor):
        """Within: row ``r`` of an input batch gets ``deltas[r]`` (shape ``(rows, k, dim)``)
        instead of ``delta`` -- several probes' tails in one forward. The batch must have
        ``len(deltas)`` rows."""
        self._rows = deltas
        try:
            yield
        finally:
            self._rows = None

    @contextlib.contextmanager
    def placed(self, ends):
        """Within: each row's prompt ends at column ``ends[r]`` (exclusive) of a forward's
        input -- a sequence or tensor per row, one int for every row, or None: no prompt
        ends in these inputs (nothing is added)."""
        before, self._ends = self._ends, ends
        try:
            yield
        finally:
            self._ends = before

    @property
    def weight(self) -> torch.nn.Parameter:  # for callers that read the embedding matrix
        return self.base.weight

    def prompt_ends(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Each row's prompt end in this input (``placed``, or the default), or None."""
        ends = self._ends
        if isinstance(ends, str):  # unsaid
            ends = input_ids.shape[-1] if input_ids.shape[-1] > 1 else None
        if ends is None:
            return None
        return torch.as_tensor(ends, dtype=torch.long, device=input_ids.device).expand(input_ids.shape[0])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        ends = self.prompt_ends(input_ids)
        if ends is None:
            return out
        k, width = self.tail.numel(), input_ids.shape[-1]
        pos = ends[:, None] - k + torch.arange(k, device=input_ids.device)  # the tail's columns, per row
        hit = (ends >= k) & (ends <= width) & (input_ids.gather(-1, pos.clamp(0, width - 1)) == self.tail).all(-1)
        if not bool(hit.any()):
            return out
        rows = self._rows
        if rows is not None and rows.shape[0] != input_ids.shape[0]:
            raise ValueError(f"per_row: {rows.shape[0]} deltas for a batch of {input_ids.shape[0]} rows")
        which = hit.nonzero()[:, 0]
        values = self.delta[None].expand(len(which), -1, -1) if rows is None else rows[which]
        add = torch.zeros_like(out)
        add[which[:, None], pos[which]] = values.to(out.dtype)
        return out + add


def placed(model, ends):
    """``TemplateTail.placed`` on the model's tail, or nothing where it has none."""
    tail = find(model)
    return tail.placed(ends) if tail is not None else contextlib.nullcontext()


def _blank(value):
    if isinstance(value, str):
        return SENTINEL
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [SENTINEL] * len(value)
    return value


def _common_suffix(seqs: list[list[int]]) -> list[int]:
    n = 0
    while all(len(s) > n for s in seqs) and len({s[len(s) - 1 - n] for s in seqs}) == 1:
        n += 1
    return seqs[0][len(seqs[0]) - n:] if n else []


def _texts(task, rows: list[dict]) -> list[str]:
    """The template rendered with every text field set to a placeholder word, then the
    prompts of ``rows`` (the first ``SAMPLE``): what a template tail is the common end of."""
    rows = rows[:SAMPLE]
    if not rows:
        raise ConfigError(f"--peft template: task {task.name!r} has no training rows to find its template in")
    try:
        skeleton = task.prompt({k: _blank(v) for k, v in rows[0].items()})
    except Exception as exc:  # a template that needs real field values
        raise ConfigError(f"--peft template: task {task.name!r} cannot render its template with placeholder "
                          f"fields ({exc}); use --peft lora or prefix") from None
    return [skeleton, *map(task.prompt, rows)]


def template_tail(task, tok, rows: list[dict]) -> list[int]:
    """The token ids every prompt ends with and no row writes: the longest common suffix
    of the prompts of ``rows`` (the first ``SAMPLE``) and of the template rendered with
    every text field set to a placeholder word."""
    tail = _common_suffix([tok(text, add_special_tokens=False).input_ids for text in _texts(task, rows)])
    if not tail:
        raise ConfigError(f"--peft template: the prompts of task {task.name!r} end with the row's own text, not "
                          "with template words (nothing to train); use --peft lora or prefix")
    return tail


def ends_with_template(task, rows: list[dict]) -> bool:
    """Whether the same texts as ``template_tail``'s end with the same characters -- words of
    the template, not of a row: the tail seen without a tokenizer (what the default recipe
    chooses by before a model is loaded)."""
    try:
        texts = _texts(task, rows)
    except ConfigError:  # no rows, or a template that needs real field values
        return False
    return bool(_common_suffix([list(t) for t in texts]))


def attach(model, tail: list[int]) -> tuple[object, list[tuple[str, torch.Tensor]]]:
    """Wrap the input embedding in a ``TemplateTail``; returns the model and its one
    trained tensor, named."""
    base = model.get_input_embeddings()
    if isinstance(base, TemplateTail):
        raise ConfigError("--peft template: this model already has a trained template")
    wrapper = TemplateTail(base, tail)
    model.set_input_embeddings(wrapper)
    name = next(n for n, p in model.named_parameters() if p is wrapper.delta)
    return model, [(name, wrapper.delta)]


def find(model) -> TemplateTail | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb if isinstance(emb, TemplateTail) else None


TOKEN = "<zoobj_tail_{}>"  # the added tokens of an exported tail, one per tail token


def _scale(embedding) -> float:
    """What an embedding module multiplies its rows by (Gemma's sqrt(hidden); 1 elsewhere)."""
    scale = getattr(embedding, "scalar_embed_scale", None)
    if scale is None:
        scale = getattr(embedding, "embed_scale", 1.0)
    return float(scale)


def as_added_tokens(model, tok):
    """A plain transformers model and tokenizer (copies) that answer like ``model`` with
    its trained tail, textual-inversion style: the tail's k tokens get k added tokens
    whose input rows hold the trained vectors (``base row + delta / scale``), and a prompt
    ends with them instead of the template's closing words. They are never outputs: the
    head is untied from the input embeddings with zero rows for them, and the generation
    config suppresses them (``suppress_tokens``), so ``generate`` samples from exactly the
    trained model's distribution over the real vocabulary. (Copies of the tail tokens'
    output rows would tie with those tokens only up to the matrix product's rounding,
    and an added newline then wins now and again.) Returns ``(model, tokenizer, record)``."""
    wrapper = find(model)
    tail, k = wrapper.tail.tolist(), wrapper.tail.numel()
    model.set_input_embeddings(wrapper.base)
    try:
        plain = copy.deepcopy(model)
    finally:
        model.set_input_embeddings(wrapper)
    tok = copy.deepcopy(tok)
    names = [TOKEN.format(j) for j in range(k)]
    if any(name in tok.get_vocab() for name in names):
        raise ModelError(f"the tokenizer already has a token named like {names[0]!r}: export this run from its base model")
    tok.add_tokens(names, special_tokens=True)
    ids = tok.convert_tokens_to_ids(names)
    emb, head = plain.get_input_embeddings(), plain.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    with torch.no_grad():
        if max(ids) >= emb.weight.shape[0]:
            plain.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
            emb, head = plain.get_input_embeddings(), plain.get_output_embeddings()
        if tied:  # the output rows must not learn the added tokens' input vectors
            head.weight = torch.nn.Parameter(emb.weight.detach().clone())
            for config in {id(c): c for c in (plain.config, plain.config.get_text_config())}.values():
                config.tie_word_embeddings = False
        emb.weight[ids] = emb.weight[tail] + wrapper.delta.detach().to(emb.weight.dtype) / _scale(emb)
        if head is not None:
            head.weight[ids] = 0.0
        wanted = wrapper.base(wrapper.tail[None]) + wrapper.delta
        got = emb(torch.tensor([ids], device=emb.weight.device))
        if not torch.allclose(got, wanted, rtol=1e-4, atol=1e-5 * float(wanted.abs().max())):
            raise ModelError("this model's input embedding is not a scaled table, so the trained tail cannot be "
                             "written as token rows; use zoobj eval --run with the run directory instead")
    if getattr(plain, "generation_config", None) is not None:
        plain.generation_config.suppress_tokens = sorted(set(plain.generation_config.suppress_tokens or []) | set(ids))
    text = tok.decode(tail)
    return plain, tok, {"tail": tail, "text": text, "tokens": names, "ids": ids}


def save(folder: str | Path, record: dict) -> None:
    """Write an exported tail's record next to the model (``FILE``), for zoobj's own loading."""
    (Path(folder) / FILE).write_text(json.dumps(record))


def load_into(model, folder: str | Path):
    """Attach the tail saved in ``folder`` (if any) to ``model``, a model loaded from it:
    the trained vectors are read from the added tokens' rows (or, for a folder exported
    before those existed, from the record itself), so zoobj's task prompts -- ending with
    the template's own words -- answer as the trained model."""
    path = Path(folder) / FILE
    if not path.is_file():
        return model
    try:
        data = json.loads(path.read_text())
        tail = [int(i) for i in data["tail"]]
        rows = data["delta"] if "delta" in data else [int(i) for i in data["ids"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path} is not a zoobj template file ({exc}); re-export the run with zoobj export") from None
    emb = model.get_input_embeddings()
    model, named = attach(model, tail)
    delta = named[0][1]
    with torch.no_grad():
        if "delta" in data:
            values = torch.tensor(rows, dtype=delta.dtype)
        else:
            device = emb.weight.device
            values = emb(torch.tensor([rows], device=device))[0] - emb(torch.tensor([tail], device=device))[0]
        if values.shape != delta.shape:
            raise ModelError(f"{path} holds rows of another shape than this model's embeddings; re-export the run")
        delta.copy_(values.to(delta.device))
    return model
