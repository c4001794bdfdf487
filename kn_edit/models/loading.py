"""``load`` and ``wrap``: the two ways to get a :class:`KnModel`."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from .adapters import ArchitectureAdapter
from .device import resolve_device
from ..errors import KnEditError, UnknownModelError
from .model import KnModel
from ..progress import Reporter, default_reporter
from .provision import OFFLINE_MODELS, provision


def _hub_unreachable_reason() -> str | None:
    """Why the Hugging Face hub cannot be asked, or None. Checked first so an offline machine fails at once
    instead of after the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"{host} cannot be resolved (offline?)"
    return None


def _model_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "model_type", None) == "bert" or any(a.endswith("ForMaskedLM") for a in architectures):
        return AutoModelForMaskedLM
    return AutoModelForCausalLM


def _from_pretrained(source: str, gguf_file: str | None = None):
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = _model_class(config).from_pretrained(source, dtype=torch.float32, **kwargs)
    return model, tokenizer


def load(
    name_or_path: str,
    device: str | torch.device = "auto",
    adapter: ArchitectureAdapter | None = None,
    reporter: Reporter | None = None,
) -> KnModel:
    """Load a model by offline name (``kn-edit models`` lists them), local folder, ``.gguf`` file or hub id."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise UnknownModelError("empty model name")
    target = resolve_device(device)
    path = Path(name_or_path).expanduser()
    if name_or_path in OFFLINE_MODELS:
        source = provision(name_or_path, reporter or default_reporter())
        model, tokenizer = _from_pretrained(str(source))
        name = name_or_path
    elif path.is_dir():
        source = path
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"{path} is a folder but holds no config.json (not a saved model)")
        model, tokenizer = _from_pretrained(str(path))
        name = str(path)
    elif path.is_file() and path.suffix == ".gguf":
        source = path
        model, tokenizer = _from_pretrained(str(path.parent), gguf_file=path.name)
        name = str(path)
    elif path.is_file():
        raise UnknownModelError(
            f"{path} is a file but not a model kn-edit can load: give a .gguf file, a model folder (config.json and "
            f"weights), an offline model name ({', '.join(OFFLINE_MODELS)}) or a Hugging Face hub id"
        )
    elif path.suffix == ".gguf" or name_or_path.startswith((".", "/", "~")):
        raise UnknownModelError(f"no such model file or folder: {name_or_path}")
    else:
        source = None
        name = name_or_path
        offline = _hub_unreachable_reason()
        if offline is not None:
            raise UnknownModelError(
                f"unknown model {name_or_path!r}: not an offline model ({', '.join(OFFLINE_MODELS)}) nor a local "
                f"folder, and the Hugging Face hub is out of reach: {offline}"
            )
        try:
            model, tokenizer = _from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            raise UnknownModelError(
                f"unknown model {name_or_path!r}: not an offline model ({', '.join(OFFLINE_MODELS)}), not a local "
                f"folder, and the Hugging Face hub could not provide it ({type(exc).__name__})"
            ) from exc
    return KnModel(model.to(target), tokenizer, adapter=adapter, name=name, source=source)


def wrap(model, tokenizer, adapter: ArchitectureAdapter | None = None, name: str | None = None) -> KnModel:
    """A KnModel around an in-memory Hugging Face model and tokenizer."""
    if model is None or tokenizer is None:
        raise KnEditError("wrap() needs both a model and its tokenizer")
    return KnModel(model, tokenizer, adapter=adapter, name=name)
