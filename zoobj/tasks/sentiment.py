"""SST-2 and SST-5: "<sentence> It was" followed by a sentiment word (MeZO App. E).

SST-2: train 1000 / dev 500 (both from GLUE train) / validation 872 (GLUE dev, the eval split).

SST-5 is shipped complete (train 8544 / validation 1101 / test 2210). Its "train" split
is 1000 rows of train.jsonl drawn with `random.Random(0).sample(range(8544), 1500)`
(the first 1000 drawn) and "dev" the next 500 drawn rows, disjoint from train, as in
MeZO's k-shot setting. The official validation set stays available as "validation";
the task is evaluated on the official test set ("test"). With data="hub" or a folder,
the splits are used as they are.
"""

from __future__ import annotations

from zoobj.tasks.classification import ClassificationTask
from zoobj.tasks.sources import Hub, shipped
from zoobj.tasks.templates import text


def it_was(row: dict) -> str:
    # The data keeps GLUE's trailing space ("clean-cut "); the template strips it.
    return f"{text(row, 'sentence')} It was"


def _from_setfit(row: dict, index: int) -> dict:
    return {"idx": index, "sentence": row["text"], "label": row["label"]}


SST2 = ClassificationTask(
    name="sst2",
    template=it_was,
    words=(" terrible", " great"),
    labels=(0, 1),
    source=shipped("sst2", hub=Hub("nyu-mll/glue", "sst2")),
    description="SST-2 binary sentiment (GLUE); eval on the GLUE dev set",
)

SST5 = ClassificationTask(
    name="sst5",
    template=it_was,
    words=(" terrible", " bad", " okay", " good", " great"),
    labels=(0, 1, 2, 3, 4),
    source=shipped("sst5", carve=(1000, 500),
                   hub=Hub("SetFit/sst5", splits=("train", "validation", "test"), convert=_from_setfit)),
    eval_split="test",
    description="SST-5 five-way sentiment; train/dev drawn from the train file, eval on the official test set",
)
