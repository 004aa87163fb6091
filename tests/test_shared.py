"""--layers and the shared lower blocks: the same losses, answers and trajectories as the
plain path, for scoring and generation, LoRA and full parameters, N = 1 and N > 1."""

import json

import pytest
import torch

from tests.tiny import tiny_gemma, tiny_llama, tiny_tokenizer
from zoobj import MeZO
from zoobj.errors import ConfigError
from zoobj.model import blocks
from zoobj.model.params import trainable_parameters
from zoobj.model.prefix import SharedPrefix
from zoobj.run.objective import make_objective
from zoobj.tasks import get_task


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def rows(task_name, n, start=0):
    task = get_task(task_name)
    return task, task.load(task.eval_split)[start:start + n]


def model_and_params(tok, peft, layers, arch="gemma"):
    build = tiny_gemma if arch == "gemma" else tiny_llama
    kw = {"sliding_window": 4096} if arch == "gemma" else {}  # SQuAD prompts are long in a 400-token vocabulary
    model = build(len(tok), seed=3, layers=4, **kw)
    model, named = trainable_parameters(model, peft, seed=0, tok=tok, layers=layers)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters something to say
        for _, p in named:
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model, [p for _, p in named]


# ----------------------------------------------------------------------------- --layers


def test_parse_layers_and_its_errors():
    assert blocks.parse_layers("top:3", 18) == [15, 16, 17]
    assert blocks.parse_layers("12-17", 18) == list(range(12, 18))
    for bad in ("top:0", "top:19", "5-3", "18", "x", "top:"):
        with pytest.raises(ConfigError, match="--layers .*this model has 18 decoder blocks"):
            blocks.parse_layers(bad, 18)


@pytest.mark.parametrize("arch", ["gemma", "llama"])
def test_layers_keeps_the_chosen_blocks_and_the_final_norm(tok, arch):
    model, params = model_and_params(tok, "none", "top:1", arch)
    names = {n for n, p in model.named_parameters() if any(p is q for q in params)}
    assert names and all(n.startswith("model.layers.3.") or n == "model.norm.weight" for n in names)
    assert "model.norm.weight" in names
    assert blocks.trained_blocks(model, params) == [3]
    assert blocks.lowest_trained_block(model, params) == 3


def test_layers_with_lora_adapts_only_those_blocks(tok):
    model, params = model_and_params(tok, "lora", "1-2")
    lora = [n for n, p in model.named_parameters() if any(p is q for q in params)]
    assert lora and all(".layers.1." in n or ".layers.2." in n for n in lora)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in lora} == {"q_proj", "v_proj"}
    assert blocks.trained_blocks(model, params) == [1, 2]


def test_layers_refused_with_prefix_and_with_embeddings(tok):
    with pytest.raises(ConfigError, match="--layers does not apply to --peft prefix"):
        trainable_parameters(tiny_gemma(len(tok)), "prefix", tok=tok, layers="top:1")
    with pytest.raises(ConfigError, match="--train-embeddings"):
        trainable_parameters(tiny_gemma(len(tok)), "none", train_embeddings=True, layers="top:1")


# ----------------------------------------------------------------------------- when it may run


def test_no_sharing_where_a_trained_tensor_is_below_the_cut(tok):
    model = tiny_gemma(len(tok), layers=4)
    _, everything = trainable_parameters(model, "none")
    assert SharedPrefix.build(model, [p for _, p in everything]) == (None, "")  # block 0 trains
    emb = model.get_input_embeddings().weight
    top = [p for n, p in model.named_parameters() if n.startswith("model.layers.3.")]
    shared, why = SharedPrefix.build(model, top + [emb])
    assert shared is None and "below every block" in why
    prefixed, named = trainable_parameters(tiny_gemma(len(tok), layers=4), "prefix", tok=tok)
    shared, why = SharedPrefix.build(prefixed, [p for _, p in named])
    assert shared is None and "prefix" in why


def test_no_sharing_for_an_unknown_architecture():
    class Odd(torch.nn.Module):
        config = type("C", (), {"num_hidden_layers": 3})()

        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 3), torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 3)

        def get_input_embeddings(self):
            return self.a[0]

    shared, why = SharedPrefix.build(Odd(), list(Odd().parameters()))
    assert shared is None and "no decoder block list" in why


# ----------------------------------------------------------------------------- same numbers


def probe_losses(model, tok, params, task, batch, metric, shared, n, steps=2, kind="metric", **kw):
    """Every probe's loss and the step records of ``steps`` MeZO steps, from these weights."""
    seen = []
    objective = make_objective(kind, model, tok, task, metric, batch_size=4, shared=shared, **kw)

    def closure():
        seen.append(objective(batch))
        return seen[-1]

    opt = MeZO(params, lr=0.05, eps=0.05, seed=1, n=n, shaping="rank" if n > 1 else "none")
    for _ in range(steps):
        if hasattr(objective, "prepare"):  # as the training loop does
            objective.prepare(batch)
        opt.step(closure)
    return seen, opt.trajectory


@pytest.mark.parametrize("task_name,metric,kw,peft,n", [
    ("sst2", "accuracy", {}, "none", 3),
    ("sst2", "accuracy", {"smooth": 0.5}, "lora", 1),  # scores, not only the argmax, must agree
    ("squad", "f1", {"max_new_tokens": 4}, "lora", 3),
    ("squad", "f1", {"max_new_tokens": 4}, "none", 1),
    ("squad", "f1", {"max_new_tokens": 4, "smooth": 1.0}, "lora", 3),  # greedy answers, then multi-token scores
    ("copa", "accuracy", {}, "lora", 3),  # multi-token candidates: the assembled cache feeds a second forward
    ("squad", "f1", {"kind": "ce"}, "lora", 3),  # cross-entropy: prompt + gold answer, logits on the answer only
    ("sst2", "accuracy", {"kind": "ce"}, "none", 1),
])
def test_shared_path_gives_the_plain_losses_and_trajectory(tok, task_name, metric, kw, peft, n):
    task, batch = rows(task_name, 2 if task_name == "squad" else 4)
    out = {}
    for on in (False, True):
        model, params = model_and_params(tok, peft, "top:2")
        shared = SharedPrefix.build(model, params)[0] if on else None
        assert (shared is not None) == on
        out[on] = probe_losses(model, tok, params, task, batch, metric, shared, n, **kw) + (params,)
        if on:
            assert shared.store.disabled is None and shared.hits > 0  # the probes did reuse the lower blocks
    (plain, rec_plain, w_plain), (fast, rec_fast, w_fast) = out[False], out[True]
    assert plain == pytest.approx(fast, abs=1e-5)
    for a, b in zip(rec_plain, rec_fast):
        assert a["seeds"] == b["seeds"] and a["grads"] == pytest.approx(b["grads"], abs=1e-3)
    for a, b in zip(w_plain, w_fast):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_greedy_answers_identical_under_perturbations(tok):
    from zoobj.model.inference import generate

    task, batch = rows("squad", 4)
    prompts = [task.prompt(r) for r in batch]
    model, params = model_and_params(tok, "none", "top:2")
    shared = SharedPrefix.build(model, params)[0]
    for k in range(3):  # three different perturbations of the trained blocks, restored after each
        saved = [p.clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(k)))
        plain = generate(model, tok, prompts, max_new_tokens=8, batch_size=2)
        fast = generate(model, tok, prompts, max_new_tokens=8, batch_size=2, shared=shared)
        assert fast == plain and any(plain)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    assert shared.misses == len(prompts) and shared.hits == 2 * len(prompts)
    assert shared.decode_misses >= 2  # the first generation decoded every step in full (two batches)


@pytest.mark.parametrize("arch", ["gemma", "llama"])
def test_decoding_reuses_the_lower_blocks_of_the_same_token_path(tok, arch):
    from zoobj.model.inference import generate

    task, batch = rows("squad", 4)
    prompts = [task.prompt(r) for r in batch]
    model, params = model_and_params(tok, "lora", "top:1", arch)
    shared = SharedPrefix.build(model, params)[0]
    plain = generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    first = generate(model, tok, prompts, max_new_tokens=6, batch_size=4, shared=shared)
    computed = shared.decode_misses
    assert first == plain and computed >= 1 and shared.decode_hits == 0
    again = generate(model, tok, prompts, max_new_tokens=6, batch_size=4, shared=shared)  # the same paths
    assert again == plain and shared.decode_misses == computed and shared.decode_hits == computed
    with torch.no_grad():  # a perturbation large enough to change the answers: new paths, computed in full
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(11)))
    moved_plain = generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    moved = generate(model, tok, prompts, max_new_tokens=6, batch_size=4, shared=shared)
    assert moved == moved_plain != plain and shared.decode_misses > computed


def test_the_store_follows_the_batch_and_the_lower_weights(tok):
    task, batch = rows("squad", 2)
    _, other = rows("squad", 2, start=2)
    model, params = model_and_params(tok, "lora", "top:1")
    shared = SharedPrefix.build(model, params)[0]
    objective = make_objective("metric", model, tok, task, "f1", batch_size=4, shared=shared, max_new_tokens=4)
    objective(batch)
    objective(batch)
    assert (shared.misses, shared.hits) == (2, 2)
    objective(other)  # a new batch: its own entries, the old ones dropped
    # prefill entries are keyed by the prompt's ids, decoding ones by (prompt ids, tokens so far)
    stored = {k if isinstance(k[0], int) else k[0] for k in shared.store.entries}
    assert shared.misses == 4 and stored == {tuple(tok(task.prompt(r))["input_ids"]) for r in other}
    lower = model.get_base_model().model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        lower.mul_(3.0)  # a weight below the cut written in place: the store must not be used
    fast = objective(other)
    assert shared.misses == 6
    plain = make_objective("metric", model, tok, task, "f1", batch_size=4, max_new_tokens=4)(other)
    assert fast == pytest.approx(plain, abs=1e-6)


# ----------------------------------------------------------------------------- in a run


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny4")
    tok = tiny_tokenizer()
    tiny_gemma(len(tok), layers=4, sliding_window=4096).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_runs_with_and_without_the_shared_path_agree(deep_model_dir, tmp_path):
    from zoobj.engine import trajectory as tj
    from zoobj.run.train import TrainConfig, run

    base = dict(task="sst2", metric="accuracy", model=deep_model_dir, steps=5, batch_size=4, lr=1e-3, eps=0.05,
                peft="lora", layers="top:2", eval_every=0, eval_limit=4, dev_limit=4, zero_shot=False, smooth=0.5)
    for on in (True, False):
        run(TrainConfig(output=str(tmp_path / str(on)), shared=on, **base))
    fast, plain = (tj.read_trajectory(tmp_path / str(on) / tj.TRAJECTORY) for on in (True, False))
    assert [r["seeds"] for r in fast] == [r["seeds"] for r in plain]
    for a, b in zip(fast, plain):
        assert a["grads"] == pytest.approx(b["grads"], rel=1e-3, abs=1e-4)
        assert a["loss_plus"] == pytest.approx(b["loss_plus"], abs=1e-5)
    config = json.loads((tmp_path / "True" / tj.CONFIG).read_text())
    assert config["trained_blocks"] == [2, 3] and config["layers"] == "top:2" and config["shared"] is True
    log = [json.loads(x) for x in (tmp_path / "True" / tj.LOG).read_text().splitlines()]
    assert any(e.get("event") == "shared" and e["on"] and "blocks 0-1" in e["message"] for e in log)
    log = [json.loads(x) for x in (tmp_path / "False" / tj.LOG).read_text().splitlines()]
    assert not any(e.get("event") == "shared" for e in log)


def test_a_run_says_when_the_shared_path_is_off(model_dir, tmp_path):
    from zoobj.engine import trajectory as tj
    from zoobj.run.train import TrainConfig, run

    def events(peft):
        run(TrainConfig(task="sst2", metric="accuracy", model=model_dir, steps=1, batch_size=2, eval_every=0,
                        eval_limit=2, zero_shot=False, peft=peft, output=str(tmp_path / peft)))
        log = [json.loads(x) for x in (tmp_path / peft / tj.LOG).read_text().splitlines()]
        return [e for e in log if e.get("event") == "shared"]

    (event,) = events("prefix")  # a prefix acts in every layer: nothing can be shared, and the log says so
    assert not event["on"] and "prefix" in event["message"]
    assert events("none") == []  # block 0 trains: nothing lies below it, no fallback to report
