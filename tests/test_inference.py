"""Batched scoring, generation and target NLL agree with one-at-a-time reference code."""

import pytest
import torch

from tests.tiny import tiny_gemma, tiny_llama, tiny_tokenizer
from zoobj.model import inference, kv


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["gemma-window-16", "gemma-window-512", "llama"])
def model(request, tok):
    if request.param == "llama":
        return tiny_llama(len(tok))
    return tiny_gemma(len(tok), sliding_window=int(request.param.rsplit("-", 1)[1]))


PROMPTS = ["the cat sat on the mat It was", "Title: Denmark\nQuestion: one two three red blue green\nAnswer:", "Yes"]


def naive_logprob(model, tok, prompt, cand):
    p = tok(prompt)["input_ids"]
    c = tok(cand, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(c)), len(c)


@pytest.mark.parametrize("normalize", [True, False])
def test_score_candidates_matches_one_forward_per_candidate(model, tok, normalize):
    cands = [[" great", " terrible"], [" Denmark and Norway", " one"], [" so the dog ran", " because"]]
    got = inference.score_candidates(model, tok, PROMPTS, cands, length_normalize=normalize, batch_size=2)
    for prompt, cs, row in zip(PROMPTS, cands, got):
        for c, value in zip(cs, row):
            total, n = naive_logprob(model, tok, prompt, c)
            assert value == pytest.approx(total / n if normalize else total, abs=1e-4)


def test_single_token_candidates_need_one_forward(model, tok):
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        inference.score_candidates(model, tok, PROMPTS, [["Yes", "No"]] * 3, batch_size=8)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_relative_scores_cost_only_the_candidates_rows_of_the_head(model, tok):
    cands = [[" great", " red", " blue"]] * 3  # single tokens in the tiny vocabulary
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) == 1 for c in cands[0])
    keys = set(model.state_dict())
    full = inference.score_candidates(model, tok, PROMPTS, cands, batch_size=8)
    inference.score_candidates(model, tok, PROMPTS, cands, batch_size=8, relative=True)  # the head is checked once
    widths = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: widths.append(out.shape[-1]))
    try:
        rel = inference.score_candidates(model, tok, PROMPTS, cands, batch_size=8, relative=True)
    finally:
        handle.remove()
    assert widths == [3]  # three vocabulary rows, not the vocabulary
    for f, r in zip(full, rel):  # the same scores up to one constant per row
        shift = [a - b for a, b in zip(r, f)]
        assert max(shift) - min(shift) < 1e-4
        assert max(range(3), key=r.__getitem__) == max(range(3), key=f.__getitem__)
    assert set(model.state_dict()) == keys  # nothing was attached to the model
    mixed = [[" Denmark and Norway", " one"]] * 3  # several tokens: the plain log-softmax
    assert inference.score_candidates(model, tok, PROMPTS, mixed, relative=True) == inference.score_candidates(
        model, tok, PROMPTS, mixed)


def test_a_model_that_changes_its_logits_after_the_head_keeps_its_head(tok):
    model = tiny_gemma(len(tok), sliding_window=512)
    model.config.final_logit_softcapping = 0.5  # logits = 0.5 tanh(head / 0.5): not the head's output
    assert inference._exact_head(model, tok(PROMPTS[0])["input_ids"]) is None
    cands = [[" great", " red"]] * 3
    full = inference.score_candidates(model, tok, PROMPTS, cands)
    assert inference.score_candidates(model, tok, PROMPTS, cands, relative=True) == full
    prompts = PROMPTS + ["red blue"]
    assert inference.generate(model, tok, prompts, max_new_tokens=6) == [naive_generate(model, tok, p, 6) for p in prompts]
    plain = tiny_gemma(len(tok), sliding_window=512)
    assert inference._exact_head(plain, tok(PROMPTS[0])["input_ids"]) is plain.get_output_embeddings()


def naive_generate(model, tok, prompt, max_new):
    ids = tok(prompt)["input_ids"]
    stops = kv.stop_ids(tok)
    out = []
    for _ in range(max_new):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(nxt)
        if nxt in stops:
            break
    return tok.decode(out, skip_special_tokens=True).split("\n", 1)[0].strip()


@pytest.mark.parametrize("batch_size", [2, 8])
def test_generate_matches_greedy_one_at_a_time(model, tok, batch_size):
    prompts = PROMPTS + ["the dog ran in the park and the cat sat on the mat so", "red blue"]
    got = inference.generate(model, tok, prompts, max_new_tokens=12, batch_size=batch_size)
    assert got == [naive_generate(model, tok, p, 12) for p in prompts]
    assert any(got)  # a random model still says something


def test_target_nll_matches_reference(model, tok):
    targets = [" great", " one\n", " Yes No Maybe"]
    got = inference.target_nll(model, tok, PROMPTS, targets, batch_size=2)
    total, count = 0.0, 0
    for p, t in zip(PROMPTS, targets):
        lp, n = naive_logprob(model, tok, p, t)
        total -= lp
        count += n
    assert got == pytest.approx(total / count, abs=1e-4)


def test_rows_that_stop_early_leave_the_batch_without_changing_others(model):
    tok = tiny_tokenizer()  # a fresh one: its stop set is changed below
    prompts = PROMPTS + ["the dog ran in the park and the cat sat on the mat so", "red blue"]
    free = inference.generate(model, tok, prompts, max_new_tokens=12, batch_size=8)
    # make the second token of some rows' answers a stop token, so they end early
    early = {tok(free[i], add_special_tokens=False)["input_ids"][1] for i in (0, 3)}
    tok._zoobj_stop_ids = kv.stop_ids(tok) | early
    got = inference.generate(model, tok, prompts, max_new_tokens=12, batch_size=8)
    assert got == [naive_generate(model, tok, p, 12) for p in prompts]
    assert len({len(g) for g in got}) > 1 and got != free


@pytest.mark.parametrize("peft", ["lora", "prefix"])
def test_peft_models_decode_with_the_cache_like_a_full_forward(tok, peft):
    from zoobj.model.params import trainable_parameters

    model, named = trainable_parameters(tiny_gemma(len(tok), sliding_window=512), peft, seed=0)
    with torch.no_grad():
        for _, p in named:
            p.add_(torch.randn_like(p) * 0.5)  # an adapter that actually changes the outputs
    prompts = ["the cat sat on the mat It was", "red blue"]
    got = inference.generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    assert got == [naive_generate(model, tok, p, 6) for p in prompts]


def test_prefix_starts_as_the_keys_and_values_of_real_tokens(tok):
    import copy

    from zoobj.model.params import init_prefix_from_tokens, trainable_parameters

    base = tiny_gemma(len(tok), sliding_window=512)
    words = [5, 9, 13, 21, 30]
    prompt = tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = base(input_ids=torch.tensor([words + prompt])).logits[0, len(words):]
        model, named = trainable_parameters(copy.deepcopy(base), "prefix", seed=0, tok=tok)
        seeded = named[0][1].detach().clone()
        init_prefix_from_tokens(model, words)
        got = model(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long)).logits[0]
        plain = base(input_ids=torch.tensor([prompt])).logits[0]
    # the prompt after the prefix reads exactly as after those five tokens
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)
    assert not torch.equal(seeded, named[0][1])  # the seeded init drew other words
    again, named2 = trainable_parameters(copy.deepcopy(base), "prefix", seed=0, tok=tok)
    assert torch.equal(seeded, named2[0][1])  # and the same ones for the same seed
