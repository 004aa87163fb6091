"""SQuAD F1 and EM of the untrained model on the first N dev questions: the baseline a
SQuAD dev sweep (bench/sweep.py) is read against. With ``prefix`` or ``lora`` it scores
the model with a freshly initialised adapter (step 0 of such a run).

    python bench/dev_zero_shot.py 48            # the plain model
    python bench/dev_zero_shot.py 48 prefix     # with the seeded real-activation prefix

Prints both metrics with 95% bootstrap intervals and the first answers beside the gold
ones; the LAST line is one JSON object.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from zoobj.model.loading import load_model
    from zoobj.model.params import trainable_parameters
    from zoobj.run.objective import evaluate, predict
    from zoobj.tasks import get_task, train_dev

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 48
    peft = sys.argv[2] if len(sys.argv) > 2 else "none"
    start = time.time()
    task = get_task("squad")
    _, dev, _ = train_dev(task, None, seed=0)
    rows = dev[:n]
    model, tok = load_model("gemma-3-270m")
    if peft != "none":
        model, _ = trainable_parameters(model, peft, seed=0, tok=tok)
    preds = predict(model, tok, task, rows, batch_size=32)
    result = {"peft": peft, "n": len(rows)}
    for name in ("f1", "exact_match"):
        r = evaluate(model, tok, task, name, rows=rows, predictions=preds)
        result[name] = {"value": round(r["value"], 4), "ci95": [round(x, 4) for x in r["ci95"]]}
    for pred, row in list(zip(preds, rows))[:5]:
        print(f"{pred[:80]!r:84} gold {row['answers'][0]!r}")
    result["seconds"] = round(time.time() - start)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
