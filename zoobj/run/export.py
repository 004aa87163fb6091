"""A run's trained model from its base model and trajectory: ``rebuild`` (in memory),
``export`` (a folder that loads with ``from_pretrained``), and ``save_model_dir``,
which writes such a folder whole or not at all (also ``--save-model``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from zoobj.engine import trajectory as tj
from zoobj.errors import ConfigError
from zoobj.run.config import TrainConfig, load_run_config
from zoobj.run.session import Session, prepare, weights_hash


def kept_steps(run_dir: str | Path, n_records: int) -> int:
    """How many trajectory steps the run's result stands for: all of them, or with
    ``--keep best`` those up to the best dev evaluation (as recorded when the run ended)."""
    path = Path(run_dir) / tj.EVAL
    if not path.exists():
        return n_records
    result = tj.read_json(path)
    if result.get("steps") != n_records or result.get("kept_steps") is None:
        return n_records  # continued since (or never finished): the trajectory's end
    return int(result["kept_steps"])


def rebuild(run_dir: str | Path) -> tuple[TrainConfig, Session]:
    """The run's trained model in memory: its base model, checked, plus its trajectory
    replayed with the noise kernel the run recorded."""
    cfg = load_run_config(run_dir)
    saved = tj.read_json(Path(run_dir) / tj.CONFIG)
    session = prepare(cfg, recorded=saved)
    if weights_hash(session.model) != saved["base_weights_sha256"]:
        raise ConfigError(f"the base model {cfg.model!r} is not the one run {run_dir} started from")
    records = tj.read_trajectory(Path(run_dir) / tj.TRAJECTORY)
    session.optimizer.replay(records[: kept_steps(run_dir, len(records))])
    session.optimizer.remove_hooks()
    return cfg, session


def export(run_dir: str | Path, target: str | Path) -> Path:
    """Base model + trajectory -> a folder that loads with ``from_pretrained`` (see
    ``ParamSet.save`` for each parameter set's form) and its model card."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"output folder {target} exists and is not empty; choose another --output or remove it "
                          "first (zoobj export never overwrites)")
    cfg, session = rebuild(run_dir)
    records = tj.read_trajectory(Path(run_dir) / tj.TRAJECTORY)
    kept = kept_steps(run_dir, len(records))
    about = (f"zoobj run `{run_dir}`: task `{cfg.task}`, objective `{cfg.objective}`"
             f"{f' ({cfg.metric})' if cfg.objective == 'metric' else ''}, base model `{cfg.model}`, "
             f"parameter set `{session.param_set.name}`, {kept} of {len(records)} steps kept.")
    save_model_dir(session, target, about)
    return Path(target)


def model_card(about: str, usage: str) -> str:
    """The README.md of an exported folder: where it came from and how to prompt it."""
    return (f"# A model fine-tuned with zoobj\n\n{about}\n\nMeZO (Malladi et al., NeurIPS 2023): zeroth-order "
            f"fine-tuning with forward passes only.\n\n## How to use it\n\n{usage}\n")


def _readable(folder: Path) -> None:
    """The permissions of a folder the user made (a temp folder is its owner's alone):
    folders 0777 and files 0666, less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def save_model_dir(session: Session, target: str | Path, about: str = "") -> str:
    """The trained model (``session.param_set.save``) and its model card, written into a
    temp folder and renamed: the folder is whole or absent. Returns how to use it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        usage = session.param_set.save(session.model, session.tok, tmp)
        (tmp / "README.md").write_text(model_card(about or "A zoobj run's trained weights.", usage))
        _readable(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return usage
