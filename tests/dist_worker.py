"""Run by tests/test_distributed.py under torchrun: train the same settings under each
parallel mode and leave each rank's final weights in ``<out>/weights-<mode>-<rank>.safetensors``."""

import json
import sys

from safetensors.torch import save_file

from zoobj.model.loading import load_model
from zoobj.run import distributed
from zoobj.run.train import TrainConfig, run


def main(model_dir: str, out: str, settings: str) -> None:
    world = distributed.from_env()
    try:
        for mode, extra in json.loads(settings).items():
            model, tok = load_model(model_dir)
            cfg = TrainConfig(model=model_dir, output=f"{out}/run-{mode}", **{"peft": "none", **extra})  # full parameters
            result = run(cfg, model=model, tok=tok, world=world)
            state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}  # tied tensors: copies
            save_file(state, f"{out}/weights-{mode}-{world.rank}.safetensors")
            with open(f"{out}/result-{mode}-{world.rank}.json", "w") as fh:
                json.dump({"result": result, "bytes": world.bytes}, fh)
        distributed.close(world, together=True)
    finally:
        distributed.close(world)


if __name__ == "__main__":
    main(*sys.argv[1:])
