"""--peft template: the prompt's closing tokens as the trained tensor, and the prompt
bodies computed once per batch (zoobj.model.tail_probes.PromptBodyStore)."""

import pytest
import torch

from tests.tiny import tiny_gemma, tiny_tokenizer
from zoobj import MeZO
from zoobj.errors import ConfigError
from zoobj.model import inference, kv
from zoobj.model.params import trainable_parameters
from zoobj.model.params import TemplateParams
from zoobj.model.tail_probes import PromptBodyStore
from zoobj.model.template import template_tail
from zoobj.tasks import get_task


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def squad(n=6):
    task = get_task("squad")
    return task, task.load("train")[:n]


def tuned(tok, scale=0.5, window=4096):
    task, rows = squad()
    model = tiny_gemma(len(tok), seed=3, layers=2, sliding_window=window)
    with torch.no_grad():  # init-sized (tied) embeddings give near-uniform logits: nothing could move them
        model.get_input_embeddings().weight.mul_(30.0)
    model, named = trainable_parameters(model, "template", tok=tok, template_tail=template_tail(task, tok, rows))
    with torch.no_grad():
        named[0][1].add_(scale * torch.randn(named[0][1].shape, generator=torch.Generator().manual_seed(0)))
    return task, rows, model, named


def test_tail_is_the_templates_closing_tokens(tok):
    task, rows = squad()
    tail = template_tail(task, tok, rows)
    assert tok.decode(tail).strip().endswith("Answer:")
    for row in rows:  # every prompt ends with it
        assert tok(task.prompt(row), add_special_tokens=False).input_ids[-len(tail):] == tail


def test_template_trains_one_small_tensor_and_starts_at_the_base_model(tok):
    task, rows = squad()
    base = tiny_gemma(len(tok), seed=3, layers=2, sliding_window=4096)
    prompts = [task.prompt(r) for r in rows]
    before = inference.generate(base, tok, prompts, max_new_tokens=6)
    model, named = trainable_parameters(base, "template", tok=tok, template_tail=template_tail(task, tok, rows))
    assert len(named) == 1 and named[0][1].shape == (len(template_tail(task, tok, rows)), 32)
    assert inference.generate(model, tok, prompts, max_new_tokens=6) == before  # delta = 0: the base model
    with pytest.raises(ConfigError, match="--layers does not apply to --peft template"):
        trainable_parameters(base, "template", layers="top:1", template_tail=[1])


def _added(emb, ids, **placed):
    """Per position: how much the tail added to the embedding of ``ids``."""
    with emb.placed(placed["ends"]) if placed else torch.no_grad():
        return (emb(ids) - emb.base(ids)).abs().sum(-1)


def test_delta_acts_only_at_the_prompts_end(tok):
    task, rows, model, named = tuned(tok)
    emb, tail = model.get_input_embeddings(), model.get_input_embeddings().tail.tolist()
    k = len(tail)
    middle = torch.tensor([[5, 6, *tail, 7]])  # the tail inside the text, the prompt ending elsewhere
    assert _added(emb, middle).eq(0).all()
    twice = torch.tensor([[5, *tail, 6, *tail]])  # the row's text holds the tail too: only the end moves
    diff = _added(emb, twice)[0]
    assert diff[-k:].gt(0).all() and diff[:-k].eq(0).all()
    padded = torch.tensor([[0, 0, 5, *tail], [5, 6, 7, *tail]])  # left padding: every prompt ends at the last column
    assert _added(emb, padded)[:, -k:].gt(0).all() and _added(emb, padded)[:, :-k].eq(0).all()
    target = _added(emb, torch.tensor([[5, 6, *tail, *tail]]), ends=2 + k)[0]  # a prompt and a target that holds the tail
    assert target[2:2 + k].gt(0).all() and target[:2].eq(0).all() and target[2 + k:].eq(0).all()
    assert _added(emb, twice, ends=None).eq(0).all()  # no prompt ends in this input


def test_a_one_token_tail_is_never_added_to_generated_tokens(tok):
    """A one-token tail (":") that the model also generates: the delta goes to the prompt's
    last token in the prefill and to no decoding step, whichever token it produces."""
    task, rows = squad()
    model = tiny_gemma(len(tok), seed=3, layers=2, sliding_window=4096)
    prompts = [task.prompt(r) for r in rows[:3]]
    tail = tok(prompts[0], add_special_tokens=False).input_ids[-1:]
    model, named = trainable_parameters(model, "template", tok=tok, template_tail=tail)
    with torch.no_grad():
        named[0][1].add_(3.0)
    emb = model.get_input_embeddings()
    assert _added(emb, torch.tensor([tail])).eq(0).all()  # a one-token forward is a decoding step
    seen = []
    hook = emb.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), (out - m.base(args[0])).abs().sum(-1))))
    try:
        inference.generate(model, tok, prompts, max_new_tokens=6)
        ids = torch.tensor([tok(prompts[0]).input_ids])  # and a decoding that is made to produce the tail itself
        out = model(input_ids=ids, use_cache=True)
        forced = torch.full_like(out.logits[:, -1], -1e9)
        forced[:, tail[0]] = 0.0
        inference.greedy(model, forced, kv.cache_out(out), torch.ones_like(ids), 3, torch.tensor([-1]), 0)
    finally:
        hook.remove()
    prefills = [(ids, d) for ids, d in seen if ids.shape[1] > 1]
    steps = [(ids, d) for ids, d in seen if ids.shape[1] == 1]
    assert prefills and any(int(ids[0, 0]) == tail[0] for ids, _ in steps)  # the tail token was generated
    assert all(d[:, -1].gt(0).all() and d[:, :-1].eq(0).all() for _, d in prefills)
    assert all(d.eq(0).all() for _, d in steps)


def test_shared_body_gives_the_plain_answers_scores_and_nll(tok):
    task, rows, model, named = tuned(tok)
    prompts = [task.prompt(r) for r in rows]
    shared, note = TemplateParams().fast_path(model, [named[0][1]])
    assert isinstance(shared, PromptBodyStore) and "prompt bodies" in note
    plain = inference.generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    assert inference.generate(model, tok, prompts, max_new_tokens=6, batch_size=4, shared=shared) == plain
    targets = [task.target(r) for r in rows]
    a = inference.target_nll(model, tok, prompts, targets, batch_size=4)
    b = inference.target_nll(model, tok, prompts, targets, batch_size=4, shared=shared)
    assert b == pytest.approx(a, rel=1e-4)
    cands = [[" yes", " no way"]] * len(prompts)
    sa = inference.score_candidates(model, tok, prompts, cands, batch_size=4)
    sb = inference.score_candidates(model, tok, prompts, cands, batch_size=4, shared=shared)
    assert torch.allclose(torch.tensor(sa), torch.tensor(sb), atol=1e-4)
    misses = shared.misses
    assert inference.generate(model, tok, prompts, max_new_tokens=6, batch_size=4, shared=shared) == plain
    assert shared.hits == len(prompts) and shared.misses == misses  # the next probe reuses every body
    # a probe moves the tail: the shared path follows it
    with torch.no_grad():
        named[0][1].mul_(-3.0)
    moved = inference.target_nll(model, tok, prompts, targets, batch_size=4)
    assert moved != pytest.approx(a, rel=1e-6)
    assert inference.target_nll(model, tok, prompts, targets, batch_size=4, shared=shared) == pytest.approx(moved, rel=1e-4)


def test_mezo_on_the_tail_lowers_the_target_loss(tok):
    task, rows, model, named = tuned(tok, scale=0.0)
    prompts, targets = [task.prompt(r) for r in rows], [" yes"] * len(rows)  # the token right after the tail
    shared, _ = TemplateParams().fast_path(model, [named[0][1]])
    loss = lambda: inference.target_nll(model, tok, prompts, targets, shared=shared)  # noqa: E731
    start = loss()
    opt = MeZO([named[0][1]], lr=0.1, eps=2e-2, seed=0, n=4, shaping="zscore")
    for _ in range(20):
        opt.step(loss)
    assert loss() < start - 0.5


SQUAD_RUN = ["--task", "squad", "--metric", "f1", "--peft", "template", "--n", "2", "--shaping", "zscore",
             "--lr", "0.5", "--eps", "0.5", "--batch-size", "2", "--eval-limit", "4", "--eval-every", "0",
             "--train-max-new-tokens", "4"]


def test_a_template_run_resumes_exports_and_reevaluates_to_its_number(model_dir, tmp_path, capsys):
    import json

    from tests.test_cli import cli
    from zoobj.engine import trajectory as tj
    from zoobj.model import template

    whole, cut, exported = tmp_path / "whole", tmp_path / "cut", tmp_path / "exported"
    assert cli("train", *SQUAD_RUN, "--model", model_dir, "--steps", "3", "--output", whole) == 0
    assert cli("train", *SQUAD_RUN, "--model", model_dir, "--steps", "2", "--output", cut) == 0
    assert cli("train", "--resume", cut, "--steps", "3") == 0
    assert (cut / tj.TRAJECTORY).read_text() == (whole / tj.TRAJECTORY).read_text()
    config = json.loads((whole / tj.CONFIG).read_text())
    assert config["peft"] == "template"
    final = json.loads((whole / tj.EVAL).read_text())
    assert cli("export", whole, "--output", exported) == 0
    assert (exported / template.FILE).is_file()
    capsys.readouterr()
    assert cli("eval", "--task", "squad", "--model", exported, "--limit", "4", "--json") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["value"] == final["value"]
    assert cli("eval", "--run", whole, "--limit", "4", "--json") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["value"] == final["value"]
    record = json.loads((exported / template.FILE).read_text())
    assert record["tail"] == config["param_set"]["tail"] and len(record["ids"]) == len(record["tail"])
    assert "How to use it" in (exported / "README.md").read_text()


PLAIN = """
import json, sys
sys.modules["zoobj"] = None  # this process must not import zoobj
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, job = sys.argv[1], json.loads(open(sys.argv[2]).read())
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
added = tok.convert_tokens_to_ids(job["tokens"])


def greedy(ids):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=job["max_new_tokens"], do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert not set(out[0, len(ids):].tolist()) & set(added)  # an added token is never an output
    return tok.decode(out[0, len(ids):], skip_special_tokens=True).split("\\n", 1)[0].strip()


trained = [greedy(ids[: len(ids) - len(added)] + added) for ids in job["prompts"]]  # the trained ending
own = [greedy(ids) for ids in job["prompts"]]  # the template's own closing words
print(json.dumps([trained, own]))
"""


def test_an_exported_template_run_answers_in_plain_transformers(model_dir, tmp_path):
    """The exported folder of a template run, loaded by a process that never imports zoobj,
    gives the trained model's greedy answers when its prompts end with the added tokens --
    and the base model's with the template's own words."""
    import json
    import subprocess
    import sys

    from tests.test_cli import cli
    from zoobj.engine import trajectory as tj
    from zoobj.model import template
    from zoobj.model.loading import load_model

    run_dir, exported = tmp_path / "run", tmp_path / "exported"
    # Gaussian directions: on this tiny model every sign probe of these 3 steps ties, and the
    # test needs a run that moved its answers
    # lr and eps in units of the tail's RMS (0.107 on this tiny model): about 2 and 0.5 absolute
    assert cli("train", *SQUAD_RUN, "--model", model_dir, "--steps", "3", "--lr", "20", "--eps", "5",
               "--noise", "gaussian", "--output", run_dir) == 0
    assert cli("export", run_dir, "--output", exported) == 0
    trained = [x["prediction"] for x in tj.read_jsonl(run_dir / tj.PREDICTIONS)]
    task, tok = get_task("squad"), tiny_tokenizer()
    rows = task.load(task.eval_split)[: len(trained)]
    record = json.loads((exported / template.FILE).read_text())
    assert set(record["ids"]) <= set(json.loads((exported / "generation_config.json").read_text())["suppress_tokens"])
    job = {"tokens": record["tokens"], "max_new_tokens": task.max_new_tokens,
           "prompts": [tok(task.prompt(r)).input_ids for r in rows]}
    assert all(p[-len(record["tail"]):] == record["tail"] for p in job["prompts"])
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "plain.py").write_text(PLAIN)
    done = subprocess.run([sys.executable, str(tmp_path / "plain.py"), str(exported), str(tmp_path / "job.json")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    plain_trained, plain_own = json.loads(done.stdout.strip().splitlines()[-1])
    base_model, _ = load_model(model_dir)
    base = inference.generate(base_model, tok, [task.prompt(r) for r in rows], max_new_tokens=task.max_new_tokens)
    assert trained != base  # the run moved the answers: the comparison can tell the two apart
    assert plain_trained == trained and plain_own == base


def test_a_task_whose_prompt_ends_with_the_row_has_no_tail(tok):
    from zoobj.tasks.generation import GenerationTask
    from zoobj.tasks.sources import shipped

    bare = GenerationTask(name="bare", template=lambda row: row["question"], source=shipped("squad"))
    with pytest.raises(ConfigError, match="end with the row's own text"):
        template_tail(bare, tok, [{"question": "Who?", "answers": ["a"]}, {"question": "Where is it", "answers": ["b"]}])


def test_squad_runs_take_the_tasks_recipe_unless_told_otherwise():
    from zoobj.run.config import TrainConfig

    got = lambda **kw: TrainConfig(task="squad", **kw).resolved()  # noqa: E731
    plain = got()
    assert (plain.peft, plain.n, plain.shaping, plain.lr, plain.eps, plain.steps, plain.batch_size,
            plain.train_max_new_tokens) == ("template", 8, "zscore", 0.2, 0.2, 20, 16, 16)
    assert got(steps=5, lr=0.1).steps == 5 and got(steps=5, lr=0.1).lr == 0.1 and got(steps=5).n == 8
    lora = got(peft="lora")  # another parameter set: none of the recipe, the paper's lr/eps for it
    assert (lora.n, lora.shaping, lora.lr, lora.eps, lora.steps, lora.batch_size, lora.train_max_new_tokens) == (
        1, "none", 1e-4, 1e-2, 20, 8, 24)
    sst2 = TrainConfig(task="sst2").resolved()  # no recipe of its own (the default one is off here: test_recipes)
    assert (sst2.peft, sst2.n, sst2.shaping, sst2.lr, sst2.steps, sst2.batch_size) == ("none", 1, "none", 1e-6, 20, 8)


def test_probes_together_answer_as_each_point_alone(tok):
    task, rows, model, named = tuned(tok)
    delta = named[0][1]
    prompts = [task.prompt(r) for r in rows]
    shared, _ = TemplateParams().fast_path(model, [delta])
    gen = torch.Generator().manual_seed(1)
    points = torch.stack([delta.detach() + 10.0 * torch.randn(delta.shape, generator=gen) for _ in range(3)])
    alone = []
    base = delta.detach().clone()
    for p in points:
        with torch.no_grad():
            delta.copy_(p)
        alone.append(inference.generate(model, tok, prompts, max_new_tokens=6, batch_size=4))
    with torch.no_grad():
        delta.copy_(base)
    assert len({tuple(a) for a in alone}) > 1  # the points answer differently: the test can tell them apart
    for rows_per_forward in (64, 4):  # every point in one forward; one point per forward
        assert shared.generate_probes(tok, prompts, points, 6, rows=rows_per_forward) == alone
    with pytest.raises(ValueError, match="3 deltas for a batch of 1 rows"):
        with model.get_input_embeddings().per_row(points):
            model(input_ids=torch.tensor([model.get_input_embeddings().tail.tolist()]))


def test_a_step_with_its_probes_together_is_the_step_one_by_one(tok):
    from zoobj.run.objective import metric_objective

    task, rows, model, named = tuned(tok)
    delta = named[0][1]
    shared, _ = TemplateParams().fast_path(model, [delta])
    fn = metric_objective(model, tok, task, "f1", max_new_tokens=6, shared=shared)
    assert hasattr(fn, "probes")
    reward = lambda preds, refs, **_: sum(len(p) for p in preds) / len(preds)  # noqa: E731  (answers differ: ties rare)
    fn = metric_objective(model, tok, task, reward, max_new_tokens=6, shared=shared)
    base = delta.detach().clone()
    records = {}
    for way in ("one by one", "together"):
        with torch.no_grad():
            delta.copy_(base)
        opt = MeZO([delta], lr=0.05, eps=10.0, seed=0, n=3, shaping="zscore")
        for _ in range(2):
            opt.step(lambda: fn(rows), probes=(lambda pts: fn.probes(rows, pts)) if way == "together" else None)
        records[way] = ([(r["loss_plus"], r["loss_minus"]) for r in opt.trajectory], delta.detach().clone())
    assert records["together"][0] == records["one by one"][0]
    assert len({x for r in records["together"][0] for x in r[0] + r[1]}) > 1
    assert torch.equal(records["together"][1], records["one by one"][1])  # the same weights, bit for bit


def test_target_loss_of_the_probes_together_is_each_points_alone(tok):
    from zoobj.run.objective import ce_objective

    task, rows, model, named = tuned(tok)
    delta = named[0][1]
    prompts, targets = [task.prompt(r) for r in rows], [task.target(r) for r in rows]
    assert len({len(tok(t).input_ids) for t in targets}) > 1  # targets of several lengths: the padding is tested
    shared, _ = TemplateParams().fast_path(model, [delta])
    gen = torch.Generator().manual_seed(2)
    points = torch.stack([delta.detach() + torch.randn(delta.shape, generator=gen) for _ in range(3)])
    base, alone = delta.detach().clone(), []
    for p in points:
        with torch.no_grad():
            delta.copy_(p)
        alone.append(inference.target_nll_sum(model, tok, prompts, targets, batch_size=4))
    with torch.no_grad():
        delta.copy_(base)
    assert len({round(a[0], 3) for a in alone}) == 3
    for rows_per_forward in (64, 4):
        got = shared.nll_probes(tok, prompts, targets, points, rows=rows_per_forward)
        assert [c for _, c in got] == [c for _, c in alone]
        assert [t for t, _ in got] == pytest.approx([t for t, _ in alone], rel=1e-4)
    assert ce_objective(model, tok, task, shared=shared).together


def test_probes_together_run_prompts_longer_than_the_sliding_window_whole(tok, monkeypatch):
    task, rows, _, _ = tuned(tok)
    prompts, targets = [task.prompt(r) for r in rows], [task.target(r) for r in rows]
    lengths = sorted(len(tok(p).input_ids) for p in prompts)
    window = (lengths[1] + lengths[-2]) // 2  # some prompts' bodies are stored, the others' cannot be
    task, rows, model, named = tuned(tok, window=window)
    delta = named[0][1]
    shared, _ = TemplateParams().fast_path(model, [delta])
    fit, long = shared._split(kv.encode(tok, prompts, special=True), 6)
    assert fit and long
    gen = torch.Generator().manual_seed(1)
    points = torch.stack([delta.detach() + 10.0 * torch.randn(delta.shape, generator=gen) for _ in range(3)])
    base, answers, nll = delta.detach().clone(), [], []
    for p in points:
        with torch.no_grad():
            delta.copy_(p)
        answers.append(inference.generate(model, tok, prompts, max_new_tokens=6, batch_size=4))
        nll.append(inference.target_nll_sum(model, tok, prompts, targets, batch_size=4))
    with torch.no_grad():
        delta.copy_(base)
    assert len({a[i] for a in answers for i in long}) > 1  # the long prompts' answers tell the points apart
    assert shared.generate_probes(tok, prompts, points, 6) == answers
    got = shared.nll_probes(tok, prompts, targets, points)
    assert [c for _, c in got] == [c for _, c in nll]
    assert [t for t, _ in got] == pytest.approx([t for t, _ in nll], rel=1e-4)
    from zoobj.model import tail_probes as shared_mod

    monkeypatch.setattr(shared_mod, "PROBE_LOGITS", 1)  # one point per forward, the whole prompts' too
    assert [t for t, _ in shared.nll_probes(tok, prompts, targets, points)] == pytest.approx([t for t, _ in got], rel=1e-5)


def test_scored_probes_keep_a_forwards_logits_within_the_budget(tok, monkeypatch):
    from zoobj.model import tail_probes as shared_mod

    task, rows, model, named = tuned(tok)
    delta = named[0][1]
    prompts, targets = [task.prompt(r) for r in rows], [task.target(r) for r in rows]
    shared, _ = TemplateParams().fast_path(model, [delta])
    gen = torch.Generator().manual_seed(4)
    points = torch.stack([delta.detach() + torch.randn(delta.shape, generator=gen) for _ in range(4)])
    unbounded = shared.nll_probes(tok, prompts, targets, points, rows=64)
    seen = []
    hook = model.register_forward_hook(lambda m, args, kw, out: seen.append(out.logits.numel()), with_kwargs=True)
    try:
        positions = shared.tail.tail.numel() + max(len(tok(t, add_special_tokens=False).input_ids) for t in targets)
        monkeypatch.setattr(shared_mod, "PROBE_LOGITS", 2 * len(prompts) * positions * len(tok))  # two points fit
        got = shared.nll_probes(tok, prompts, targets, points, rows=64)
    finally:
        hook.remove()
    assert [t for t, _ in got] == pytest.approx([t for t, _ in unbounded], rel=1e-5)
    assert len(seen) == 2 and max(seen) <= shared_mod.PROBE_LOGITS  # 4 points, two per forward
    seen.clear()  # a cap below one point's rows: its prompts split over forwards, two rows each
    hook = model.register_forward_hook(lambda m, args, kw, out: seen.append(out.logits.numel()), with_kwargs=True)
    try:
        monkeypatch.setattr(shared_mod, "PROBE_LOGITS", 2 * positions * len(tok))
        got = shared.nll_probes(tok, prompts, targets, points, rows=64)
    finally:
        hook.remove()
    assert [t for t, _ in got] == pytest.approx([t for t, _ in unbounded], rel=1e-5)
    assert len(seen) == 4 * ((len(prompts) + 1) // 2) and max(seen) <= shared_mod.PROBE_LOGITS


def test_smoothed_f1_of_the_probes_together_is_each_probe_alone(tok):
    from zoobj.run.objective import metric_objective

    task, rows, model, named = tuned(tok)
    delta = named[0][1]
    shared, _ = TemplateParams().fast_path(model, [delta])
    fn = metric_objective(model, tok, task, "f1", max_new_tokens=6, shared=shared, smooth=20.0)  # both candidates weigh
    assert hasattr(fn, "probes") and hasattr(fn, "prepare")
    fn.prepare(rows)  # the answer set, from the base point (the training loop's order)
    assert max(fn.prepare(rows).count) > 1  # greedy answers and references: a softmax over several candidates
    gen = torch.Generator().manual_seed(5)
    points = [[delta.detach() + 2.0 * torch.randn(delta.shape, generator=gen)] for _ in range(4)]
    base, alone = delta.detach().clone(), []
    for p in points:
        with torch.no_grad():
            delta.copy_(p[0])
        alone.append(fn(rows))
    with torch.no_grad():
        delta.copy_(base)
    assert len({round(x, 6) for x in alone}) == 4  # the points score apart
    computed = shared.misses
    assert fn.probes(rows, points) == pytest.approx(alone, rel=1e-5, abs=1e-7)
    assert shared.misses == computed  # the prompt bodies the answers were generated over, reused


@pytest.mark.parametrize("name", ["sst2", "rte"])  # " terrible" is two tokens here; RTE's Yes/No one each
def test_classification_probes_together_score_as_each_probe_alone(tok, name):
    """The smoothed accuracy, the hard accuracy and the cross-entropy over the candidates of
    a classification task, its probes together on the template tail, are each point's
    value alone (both candidate paths: one-token candidates from the tail's logits, longer
    ones scored as targets)."""
    from zoobj.run.objective import ce_objective, metric_objective

    task = get_task(name)
    rows = task.load("train")[:8]
    model = tiny_gemma(len(tok), seed=3, layers=2, sliding_window=4096)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(30.0)
    model, named = trainable_parameters(model, "template", tok=tok, template_tail=template_tail(task, tok, rows))
    delta = named[0][1]
    shared, _ = TemplateParams().fast_path(model, [delta])
    gen = torch.Generator().manual_seed(6)
    points = [[delta.detach() + 3.0 * torch.randn(delta.shape, generator=gen)] for _ in range(4)]
    for smooth in (1.0, 0.0):
        fn = metric_objective(model, tok, task, "accuracy", shared=shared, smooth=smooth, batch_size=4)
        assert fn.together
        alone = _moved(delta, [p[0] for p in points], lambda: fn(rows))
        if smooth:
            assert len({round(x, 6) for x in alone}) == 4  # the points score apart
            assert fn.probes(rows, points) == pytest.approx(alone, rel=1e-5, abs=1e-7)
        else:
            assert fn.probes(rows, points) == alone
    ce = ce_objective(model, tok, task, shared=shared, batch_size=4)  # over the candidates: a classification task
    assert ce.over == "candidates" and ce.together
    alone = _moved(delta, [p[0] for p in points], lambda: ce(rows))
    assert len({round(x, 6) for x in alone}) == 4 and all(x > 0 for x in alone)
    assert ce.probes(rows, points) == pytest.approx(alone, rel=1e-5)
    scores = shared.choice_probes(tok, [task.prompt(r) for r in rows], [task.choices(r) for r in rows],
                                  torch.stack([p[0] for p in points]), rows=4)  # one point per forward
    for point, p in zip(scores, points):
        with torch.no_grad():
            delta.copy_(p[0])
        ref = inference.score_candidates(model, tok, [task.prompt(r) for r in rows], [task.choices(r) for r in rows],
                                         relative=True)
        for a, b in zip(point, ref):  # equal up to one constant per row
            assert [x - a[0] for x in a] == pytest.approx([x - b[0] for x in b], abs=1e-4)
    with torch.no_grad():
        delta.zero_()


def _moved(delta, points, fn):
    """``fn()`` with ``delta`` moved to each point in turn (the probes one at a time)."""
    base, out = delta.detach().clone(), []
    for p in points:
        with torch.no_grad():
            delta.copy_(p)
        out.append(fn())
    with torch.no_grad():
        delta.copy_(base)
    return out


@pytest.mark.parametrize("case", ["context holds the tail", "one-token tail"])
def test_probes_together_where_the_tail_also_stands_elsewhere(tok, case):
    """Rows whose own text (and target) holds the tail, and a one-token tail that the text is
    full of: the probes run together (no fallback) and answer and score as each point alone."""
    task, rows, model, named = tuned(tok)
    delta = named[0][1]
    if case == "context holds the tail":
        rows = [{**r, "context": r["context"] + "\nAnswer: " + r["context"][:40]} for r in rows]
        targets = [task.target(r) + "\nAnswer:" for r in rows]
    else:
        model = tiny_gemma(len(tok), seed=3, layers=2, sliding_window=4096)
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(30.0)
        model, named = trainable_parameters(model, "template", tok=tok, template_tail=template_tail(task, tok, rows)[-1:])
        delta = named[0][1]
        targets = [task.target(r) + ":" for r in rows]
    prompts = [task.prompt(r) for r in rows]
    tail = model.get_input_embeddings().tail.tolist()
    assert all(tok(p).input_ids[:-len(tail)].count(tail[0]) for p in prompts)  # the tail's tokens stand in the text
    shared, _ = TemplateParams().fast_path(model, [delta])
    gen = torch.Generator().manual_seed(4)
    points = torch.stack([delta.detach() + 10.0 * torch.randn(delta.shape, generator=gen) for _ in range(3)])
    answers = _moved(delta, points, lambda: inference.generate(model, tok, prompts, max_new_tokens=6, batch_size=4))
    assert len({tuple(a) for a in answers}) > 1
    assert shared.generate_probes(tok, prompts, points, 6) == answers
    nll = _moved(delta, points, lambda: inference.target_nll_sum(model, tok, prompts, targets, batch_size=4))
    got = shared.nll_probes(tok, prompts, targets, points)
    assert [t for t, _ in got] == pytest.approx([t for t, _ in nll], rel=1e-4) and len({round(t, 3) for t, _ in got}) == 3


def test_a_batch_the_store_cannot_serve_falls_back_alone(tok):
    """A batch with a prompt that does not end with the tail has its probes evaluated one by
    one; the next batch runs together again, and the fallbacks are counted (was: one such
    batch turned probes-together off for the rest of the run)."""
    from zoobj.run.objective import metric_objective

    task, rows, model, named = tuned(tok)
    delta = named[0][1]

    class Odd:  # SQuAD, except that a row marked odd has text after the template's tail
        def __getattr__(self, name):
            return getattr(task, name)

        def prompt(self, row):
            return task.prompt(row) + (" and more" if row.get("odd") else "")

    shared, _ = TemplateParams().fast_path(model, [delta])
    events = []
    fn = metric_objective(model, tok, Odd(), "f1", max_new_tokens=4, shared=shared, notify=events.append)
    points = [[delta.detach() + 0.1 * k] for k in range(4)]
    assert fn.together and fn.fallbacks == 0
    assert fn.probes([{**rows[0], "odd": True}, rows[1]], points) is None
    assert fn.fallbacks == 1 and len(events) == 1 and "one at a time" in events[0]["message"]
    assert len(fn.probes(rows[2:4], points)) == 4  # the next batch: together again
    assert fn.probes([{**rows[2], "odd": True}], points) is None
    assert fn.fallbacks == 2 and len(events) == 1  # counted, told once
    shared.store.disable("the one-at-a-time path met a prompt it cannot serve")
    assert len(fn.probes(rows[2:4], points)) == 4  # that does not turn the probes-together path off either


def _qa_task(folder, template):
    """A user's generation task in TOML over a few SQuAD rows."""
    import json

    rows = [{"question": r["question"], "answers": r["answers"]} for r in get_task("squad").load("train")[:12]]
    for split in ("train", "validation"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "qa.toml").write_text(f'name = "qa"\ndata_files = {{ train = "train.jsonl", validation = "validation.jsonl" }}\n'
                                    f'template = "{template}"\nanswer_field = "answers"\nmetric = "f1"\n')
    return folder / "qa.toml"


def test_the_tail_is_recorded_and_a_changed_template_is_refused(model_dir, tmp_path):
    """config.json keeps the tail's token ids and text; rebuild uses them, and refuses a task
    whose template no longer ends with them, naming the change."""
    import json

    from zoobj.engine import trajectory as tj
    from zoobj.errors import ConfigError
    from zoobj.run.export import rebuild
    from zoobj.run.train import TrainConfig, run

    task_file = _qa_task(tmp_path, "Question: {question}\\nAnswer:")
    out = tmp_path / "run"
    run(TrainConfig(task=str(task_file), model=model_dir, output=str(out), peft="template", steps=2, batch_size=2,
                    n=2, shaping="zscore", lr=0.5, eps=0.5, eval_limit=2, eval_every=0, train_max_new_tokens=3))
    recorded = json.loads((out / tj.CONFIG).read_text())["param_set"]
    assert recorded["kind"] == "template" and recorded["tail"] and recorded["text"].endswith("Answer:")
    _, session = rebuild(out)
    assert session.model.get_input_embeddings().tail.tolist() == recorded["tail"]
    _qa_task(tmp_path, "Question: {question}\\nReply:")  # reworded since the run
    with pytest.raises(ConfigError, match=r"prompts now end with .*Reply.* but this run trained the tail .*Answer"):
        rebuild(out)


def test_template_lr_and_eps_are_fractions_of_the_tail_vectors_rms(model_dir, tmp_path):
    """A template run's --lr and --eps are in units of the RMS of its tail tokens' input
    vectors (what carries from a model whose embeddings are 0.1 to one whose are 1): the
    optimizer gets them times that RMS, config.json records it, a probe moves every tail
    number by exactly eps x unit (signs), and a rebuild uses the recorded unit -- 1 for a
    run made before the unit was recorded, whose lr and eps were absolute."""
    import json

    import torch

    from tests.test_cli import cli
    from zoobj.engine import trajectory as tj
    from zoobj.model import template
    from zoobj.model.loading import load_model
    from zoobj.run.config import load_run_config
    from zoobj.run.export import rebuild
    from zoobj.run.session import prepare

    run_dir = tmp_path / "run"
    # cross-entropy: it never ties, so the tail moves and the two rebuilds can differ
    assert cli("train", *SQUAD_RUN, "--objective", "ce", "--model", model_dir, "--steps", "2", "--output", run_dir) == 0
    config = json.loads((run_dir / tj.CONFIG).read_text())
    model, tok = load_model(model_dir)
    tail = template_tail(get_task("squad"), tok, get_task("squad").load("train")[:16])
    with torch.no_grad():
        rms = float(model.get_input_embeddings()(torch.tensor([tail])).pow(2).mean().sqrt())
    assert config["unit"] == pytest.approx(rms, rel=1e-6) and 0.01 < rms < 10 and rms != pytest.approx(1.0, abs=0.05)
    session = prepare(load_run_config(run_dir))
    assert session.unit == pytest.approx(rms, rel=1e-6)
    assert (session.optimizer.lr_at(0), session.optimizer.eps) == pytest.approx((0.5 * rms, 0.5 * rms))
    delta = template.find(session.model).delta
    seen = []
    session.optimizer.step(lambda: seen.append(delta.detach().clone()) or 0.0)
    assert torch.allclose(seen[0].abs(), torch.full_like(seen[0], 0.5 * rms), rtol=1e-5)

    _, trained = rebuild(run_dir)
    config_before = dict(config)
    del config_before["unit"]  # as a template run made before the unit was recorded
    (run_dir / tj.CONFIG).write_text(json.dumps(config_before))
    _, old = rebuild(run_dir)
    assert old.unit == 1.0 and old.optimizer.eps == 0.5
    assert not torch.equal(template.find(old.model).delta, template.find(trained.model).delta)
