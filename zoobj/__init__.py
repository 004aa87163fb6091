"""zoobj: fine-tune language models toward any metric with forward passes only (MeZO)."""

from zoobj.engine.mezo import MeZO, NonFiniteLossError, decay_groups, replay

__all__ = ["MeZO", "NonFiniteLossError", "decay_groups", "replay", "__version__"]
__version__ = "0.1.0"
