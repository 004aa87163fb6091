"""Tasks: MeZO's prompts on real shipped rows, label maps, splits, TOML and dotted tasks, errors."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from zoobj.errors import ConfigError, DataError
from zoobj.tasks import TASKS, get_task, list_tasks, train_dev
from zoobj.tasks import sources

# ----------------------------------------------------------------- prompts on shipped rows

# (task, split, row index, expected prompt, expected choices or answers, expected reference)
SHIPPED_EXAMPLES = [
    ("sst2", "train", 2, "clean-cut It was", [" terrible", " great"], 1),
    ("sst5", "test", 0, "no movement , no yuks , not much of anything . It was",
     [" terrible", " bad", " okay", " good", " great"], 1),
    ("rte", "validation", 208,
     'The girl was found in Drummondville.\nDoes this mean that "Drummondville contains the girl." is true? '
     "Yes or No?\n", ["Yes", "No"], 1),
    ("cb", "validation", 14,
     'Suppose A: Your turn. B: Okay. Uh, I don\'t think they should abolish it. Can we infer that '
     '"they should abolish it"? Yes, No, or Maybe?\n', ["Yes", "No", "Maybe"], 1),
    ("boolq", "validation", 495,
     "Steve Blass -- He was inducted into the Kinston Professional Baseball Hall of Fame in 1997. "
     "Is steve blass in the hall of fame?\n", ["Yes", "No"], 0),
    ("wic", "validation", 141,
     'Does the word "bell" have the same meaning in these two sentences? Yes, No?\nBell cows.\n'
     "Who will bell the cat?\n", ["No", "Yes"], 1),
    ("copa", "train", 0, "The smoke alarm went off because", [" I lit a candle.", " I burnt my dinner."], 1),
    ("copa", "train", 1, "The girl desired her parent's approval so",
     [" she ran away from home.", " she obeyed her parent's rules."], 1),
    ("squad", "train", 766,
     "Title: 2008 Summer Olympics torch relay\nContext: Two additional teams of 40 attendants each will "
     "accompany the flame on its Mainland China route. This arrangement has however sparked several "
     "controversies.\nQuestion: How many additional teams will help with the Mainland China route?\nAnswer:",
     ["Two"], ["Two"]),
]


@pytest.mark.parametrize("name, split, index, prompt, candidates, reference", SHIPPED_EXAMPLES)
def test_prompt_and_candidates_of_a_shipped_row(name, split, index, prompt, candidates, reference):
    task = get_task(name)
    row = task.load(split)[index]
    assert task.prompt(row) == prompt
    if task.kind == "classification":
        assert task.choices(row) == candidates
        assert task.label(row) == reference
        assert task.target(row) == candidates[reference]
    else:
        assert task.answers(row) == candidates
    assert task.reference(row) == reference


def test_sst2_strips_glue_trailing_space_and_every_builtin_is_registered():
    assert get_task("sst2").prompt({"sentence": "clean-cut ", "label": 1}) == "clean-cut It was"
    assert list_tasks() == ["sst2", "sst5", "rte", "cb", "boolq", "wic", "copa", "squad"]
    assert all(TASKS[n].name == n for n in TASKS)
    assert {n: TASKS[n].kind for n in TASKS}["squad"] == "generation"
    assert {TASKS[n].metric for n in TASKS} == {"accuracy", "f1"}


def test_boolq_question_gets_question_mark_and_capital_only_when_needed():
    task = get_task("boolq")
    assert task.prompt({"passage": " P. ", "question": "is it?", "label": True}) == "P. Is it?\n"
    assert task.prompt({"passage": "P.", "question": "Is it", "label": True}) == "P. Is it?\n"


def test_copa_effect_uses_so_and_keeps_a_premise_without_period():
    task = get_task("copa")
    row = {"premise": "It rained", "choice1": "We stayed in.", "choice2": "I'm out.", "question": "effect",
           "label": 0}
    assert task.prompt(row) == "It rained so"
    assert task.choices(row) == [" we stayed in.", " i'm out."]  # only a bare "I" keeps its capital
    assert task.length_normalize is True
    with pytest.raises(DataError, match="cause' or 'effect"):
        task.prompt({**row, "question": "why"})


# ----------------------------------------------------------------------- label mapping

@pytest.mark.parametrize("name, raw_labels, indices", [
    ("sst2", [0, 1], [0, 1]),
    ("sst5", [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]),
    ("rte", ["entailment", "not_entailment"], [0, 1]),
    ("cb", ["entailment", "contradiction", "neutral"], [0, 1, 2]),
    ("boolq", [True, False], [0, 1]),  # True -> "Yes", False -> "No"
    ("wic", [False, True], [0, 1]),  # False -> "No", True -> "Yes"
    ("copa", [0, 1], [0, 1]),
])
def test_label_maps_raw_values_to_candidate_indices(name, raw_labels, indices):
    task = get_task(name)
    row = task.load("train")[0]
    got = [task.label({**row, "label": raw}) for raw in raw_labels]
    assert got == indices
    with pytest.raises(DataError, match="label"):
        task.label({**row, "label": "bogus"})


def test_boolq_and_wic_map_false_to_no():
    boolq, wic = get_task("boolq"), get_task("wic")
    assert boolq.target({"passage": "p", "question": "q", "label": False}) == "No"
    row = {"word": "w", "sentence1": "a", "sentence2": "b", "label": False}
    assert wic.target(row) == "No"


# ----------------------------------------------------------------------- shipped splits

@pytest.mark.parametrize("name, counts", [
    ("squad", {"train": 1000, "dev": 500, "validation": 1000}),
    ("sst2", {"train": 1000, "dev": 500, "validation": 872}),
    ("rte", {"train": 1000, "dev": 500, "validation": 277}),
    ("cb", {"train": 150, "dev": 100, "validation": 56}),
    ("copa", {"train": 300, "dev": 100, "validation": 100}),
    ("wic", {"train": 1000, "dev": 500, "validation": 638}),
    ("boolq", {"train": 32, "dev": 32, "validation": 1000}),
    ("sst5", {"train": 1000, "dev": 500, "validation": 1101, "test": 2210}),
])
def test_every_shipped_split_loads_with_the_documented_count(name, counts):
    task = get_task(name)
    assert task.splits() == tuple(counts)
    assert {split: len(task.load(split)) for split in counts} == counts
    assert task.has_dev
    assert task.eval_split == ("test" if name == "sst5" else "validation")


def test_sst5_train_and_dev_are_seeded_disjoint_samples_of_train_and_eval_is_test():
    task = get_task("sst5")
    train, dev = task.load("train"), task.load("dev")
    full = sources.read_rows(sources.DATA_DIR / "sst5" / "train.jsonl")
    assert len(full) == 8544
    train_ids, dev_ids = {r["idx"] for r in train}, {r["idx"] for r in dev}
    assert len(train_ids) == 1000 and len(dev_ids) == 500 and not train_ids & dev_ids
    assert train_ids | dev_ids <= {r["idx"] for r in full}
    assert task.load("train") == train  # fixed seed: the same sample every time
    assert task.eval_split == "test" and len(task.load("test")) == 2210


def test_missing_split_lists_the_available_ones():
    with pytest.raises(DataError, match="available splits: train, dev, validation$"):
        get_task("rte").load("test")


def test_shipped_files_come_with_the_package():
    data = sources.DATA_DIR
    assert data.parent.name == "zoobj" and (data / "README.md").is_file()
    assert sorted(p.name for p in data.iterdir() if p.is_dir()) == sorted(TASKS)
    assert all((data / name / "README.md").is_file() for name in TASKS)


def test_loading_works_with_hf_datasets_offline(tmp_path):
    code = "from zoobj.tasks import get_task; print(len(get_task('cb').load('validation')))"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "56"


# ----------------------------------------------------------------------------- SQuAD

def test_squad_answers_reference_and_target():
    task = get_task("squad")
    row = task.load("validation")[0]
    assert task.answers(row) == ["one", "one", "one"]
    assert task.reference(row) == ["one", "one", "one"]
    assert task.target(row) == " one\n"
    assert task.prompt(row).startswith("Title: Nikola Tesla\nContext: In an interview")
    assert task.prompt(row).endswith("\nAnswer:")
    assert (task.max_new_tokens, task.stop, task.metric) == (50, "\n", "f1")


# ---------------------------------------------------------------------------- TOML tasks

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_toml(tmp_path, body, name="mytask.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


TOPICS = [{"text": " Rain in Spain ", "label": 0}, {"text": "Cup final", "label": "sports"},
          {"text": "Elections", "label": 0}, {"text": "Goal!", "label": 1}, {"text": "Summit", "label": "world"}]

CLASSIFICATION_TOML = """
    name = "topics"
    data_files = { train = "train.jsonl", validation = "test.jsonl" }
    template = "{text}\\nTopic:"
    choices = [" world", " sports"]
    label_field = "label"
    metric = "accuracy"
"""


def test_toml_classification_task(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", TOPICS)
    write_jsonl(tmp_path / "test.jsonl", TOPICS[:2])
    task = get_task(str(write_toml(tmp_path, CLASSIFICATION_TOML)))
    assert (task.name, task.kind, task.metric, task.eval_split) == ("topics", "classification", "accuracy",
                                                                      "validation")
    rows = task.load("train")
    assert task.prompt(rows[0]) == "Rain in Spain\nTopic:"
    assert task.choices(rows[0]) == [" world", " sports"]
    assert [task.label(r) for r in rows] == [0, 1, 0, 1, 0]  # an index or the choice's text
    assert task.target(rows[1]) == " sports"
    assert len(task.load("validation")) == 2 and not task.has_dev


def test_toml_generation_task(tmp_path):
    # "a" is a string in one row and a list in the other: "4" must stay a string
    write_jsonl(tmp_path / "train.jsonl", [{"q": "2+2?", "a": "4"},
                                           {"q": "Capital of France?", "a": ["Paris", "paris"]}])
    path = write_toml(tmp_path, """
        data_files = { train = "train.jsonl", test = "train.jsonl" }
        template = "Q: {q}\\nA:"
        answer_field = "a"
        max_new_tokens = 8
    """, name="qa.toml")
    task = get_task(str(path))
    assert (task.name, task.kind, task.metric, task.eval_split, task.max_new_tokens) == ("qa", "generation", "f1",
                                                                                         "test", 8)
    first, second = task.load("train")
    assert task.prompt(first) == "Q: 2+2?\nA:"
    assert task.answers(first) == ["4"] and task.reference(second) == ["Paris", "paris"]
    assert task.target(second) == " Paris\n"


@pytest.mark.parametrize("body, message", [
    (CLASSIFICATION_TOML + 'colour = "red"\n', "unknown key 'colour'; allowed keys: name, description"),
    (CLASSIFICATION_TOML.replace('template = "{text}\\nTopic:"', ""), "missing required key 'template'"),
    (CLASSIFICATION_TOML.replace('choices = [" world", " sports"]', ""), "exactly one of 'choices'"),
    (CLASSIFICATION_TOML + 'answer_field = "a"\n', "exactly one of 'choices'"),
    (CLASSIFICATION_TOML.replace("test.jsonl", "nope.jsonl"), "data file 'nope.jsonl' for the validation split"),
    (CLASSIFICATION_TOML.replace("{text}", "{}"), "positional field"),
    (CLASSIFICATION_TOML + "choices2 = \n", "cannot read the task file"),
    (CLASSIFICATION_TOML.replace("validation =", "valid ="), "unknown split 'valid'"),
])
def test_toml_file_errors_are_one_line_config_errors_naming_the_file(tmp_path, body, message):
    write_jsonl(tmp_path / "train.jsonl", TOPICS)
    write_jsonl(tmp_path / "test.jsonl", TOPICS)
    path = write_toml(tmp_path, body)
    with pytest.raises(ConfigError, match=message) as info:
        get_task(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("row, message", [
    ({"label": 0}, r"row 3: missing field 'text'"),
    ({"text": "x"}, r"row 3: missing field 'label'"),
    ({"text": "x", "label": 2}, r"row 3: label 2 is out of range for 2 choices"),
    ({"text": "x", "label": "politics"}, r"row 3: label 'politics' is neither"),
])
def test_toml_bad_rows_are_data_errors_naming_file_row_and_field(tmp_path, row, message):
    write_jsonl(tmp_path / "train.jsonl", TOPICS[:2] + [row])
    write_jsonl(tmp_path / "test.jsonl", TOPICS)
    task = get_task(str(write_toml(tmp_path, CLASSIFICATION_TOML)))
    with pytest.raises(DataError, match=message) as info:
        task.load("train")
    assert str(tmp_path / "train.jsonl") in str(info.value)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n\n{"text": "b", label: 1}\n')
    write_jsonl(tmp_path / "test.jsonl", TOPICS)
    task = get_task(str(write_toml(tmp_path, CLASSIFICATION_TOML)))
    with pytest.raises(DataError, match=f"{tmp_path / 'train.jsonl'}:3: invalid JSON"):
        task.load("train")
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n[1, 2]\n')
    with pytest.raises(DataError, match="train.jsonl:2: expected a JSON object"):
        task.load("train")


def test_empty_split_is_a_data_error(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n")
    write_jsonl(tmp_path / "test.jsonl", TOPICS)
    task = get_task(str(write_toml(tmp_path, CLASSIFICATION_TOML)))
    with pytest.raises(DataError, match="empty"):
        task.load("train")


def test_users_folder_replaces_the_shipped_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"premise": "A.", "hypothesis": "B.", "label": "entailment"}] * 3)
    (tmp_path / "validation.csv").write_text("premise,hypothesis,label\nC.,D.,not_entailment\n")
    task = get_task("rte")
    assert task.splits(str(tmp_path)) == ("train", "validation")
    assert [task.label(r) for r in task.load("validation", data=str(tmp_path))] == [1]
    assert len(task.load("train", data=str(tmp_path))) == 3
    with pytest.raises(DataError, match="available splits: train, validation"):
        task.load("dev", data=str(tmp_path))
    write_jsonl(tmp_path / "train.jsonl", [{"premise": "A.", "label": "entailment"}])
    with pytest.raises(DataError, match="train.jsonl: row 1: missing field 'hypothesis'"):
        task.load("train", data=str(tmp_path))


# ------------------------------------------------------------------- registry and dotted

def test_unknown_task_lists_the_valid_names_in_one_line():
    with pytest.raises(ConfigError) as info:
        get_task("sst3")
    message = str(info.value)
    assert "sst2, sst5, rte, cb, boolq, wic, copa, squad" in message and "\n" not in message


def test_dotted_path_task(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(textwrap.dedent("""
        from zoobj.tasks import get_task
        SHOUT = get_task("sst2")
        def make():
            return get_task("cb")
        NOT_A_TASK = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_task("my_tasks:SHOUT") is TASKS["sst2"]
    assert get_task("my_tasks:make") is TASKS["cb"]
    with pytest.raises(ConfigError, match="is not a task: it lacks name"):
        get_task("my_tasks:NOT_A_TASK")
    with pytest.raises(ConfigError, match="cannot import task 'no_such_module:x'"):
        get_task("no_such_module:x")


# --------------------------------------------------------------------------- train_dev

def test_train_dev_uses_the_dev_split_when_there_is_one():
    train, dev, note = train_dev(get_task("cb"))
    assert (len(train), len(dev), note) == (150, 100, None)


def test_train_dev_holds_out_a_seeded_slice_of_train_otherwise(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(40)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:5])
    task = get_task(str(write_toml(tmp_path, CLASSIFICATION_TOML)))
    train, dev, note = train_dev(task, seed=1)
    assert (len(train), len(dev)) == (32, 8)  # 20% of 40 < 500
    assert not {r["text"] for r in train} & {r["text"] for r in dev}
    assert "held out 8 of 40 train rows" in note
    assert train_dev(task, seed=1) == (train, dev, note)
    assert train_dev(task, seed=2)[1] != dev
    assert len(train_dev(task, dev_size=3)[1]) == 3


# --------------------------------------------------------------------------------- Hub

def test_hub_unreachable_is_one_clear_data_error(monkeypatch):
    import datasets
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known\nmore detail")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", offline)
    with pytest.raises(DataError, match="cannot reach aps/super_glue on the Hugging Face Hub") as info:
        get_task("rte").load("train", data="hub")
    assert "\n" not in str(info.value)

    monkeypatch.setattr(sources, "_probe_hub", lambda hub: None)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"cannot load rajpurkar/squad validation from the Hugging Face Hub"):
        get_task("squad").load("validation", data="hub")


def test_hub_rows_are_converted_to_the_shipped_schema(monkeypatch):
    import datasets

    hub_rows = {
        ("aps/super_glue", "rte"): [{"premise": "A.", "hypothesis": "B.", "idx": 0, "label": 1}],
        ("aps/super_glue", "boolq"): [{"question": "q", "passage": "p", "idx": 0, "label": 0}],
        ("rajpurkar/squad", None): [{"id": "x", "title": "T_1", "context": "c", "question": "q",
                                     "answers": {"text": ["a", "b"], "answer_start": [0, 1]}}],
        ("SetFit/sst5", None): [{"text": "fine", "label": 3, "label_text": "positive"}],
    }

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        return datasets.Dataset.from_list(hub_rows[path, name])

    monkeypatch.setattr(sources, "_probe_hub", lambda hub: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert get_task("rte").load("train", data="hub")[0]["label"] == "not_entailment"
    assert get_task("boolq").load("validation", data="hub")[0]["label"] is False
    squad = get_task("squad").load("train", data="hub")[0]
    assert (squad["answers"], squad["answer_start"]) == (["a", "b"], [0, 1])
    assert get_task("squad").prompt(squad).startswith("Title: T 1\n")
    assert get_task("sst5").load("test", data="hub") == [{"idx": 0, "sentence": "fine", "label": 3}]
    assert get_task("sst5").splits("hub") == ("train", "validation", "test")
    with pytest.raises(DataError, match="no 'dev' split in the Hub copy"):
        get_task("rte").load("dev", data="hub")
    with pytest.raises(DataError, match="too few to hold out a dev set"):
        train_dev(get_task("rte"), data="hub")  # no dev on the Hub, and 1 train row


def test_toml_task_has_no_hub_source(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", TOPICS)
    write_jsonl(tmp_path / "test.jsonl", TOPICS)
    task = get_task(str(write_toml(tmp_path, CLASSIFICATION_TOML)))
    with pytest.raises(DataError, match="no Hugging Face Hub source"):
        task.load("train", data="hub")
