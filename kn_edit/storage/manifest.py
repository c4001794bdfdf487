"""What made a results folder: the kn-edit version, the code's git commit (and whether its tracked files were
changed), the command line, the config, the dates and the machine. ``evaluate`` and ``compare`` write it as
``manifest.json`` beside their results, so that every committed number says where it came from."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

MANIFEST = "manifest.json"
# The checkout kn-edit runs from (kn_edit/storage/manifest.py -> the folder holding kn_edit/).
CODE_ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(CODE_ROOT), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_state() -> dict:
    """The code's version and git state. ``commit`` is None unless kn_edit/ sits at the top of a git checkout
    (an installed copy inside another repository is not attributed to that repository's commit); ``dirty``: a
    tracked file differs from the commit (untracked files, e.g. run folders, do not count)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        kn_version = version("kn-edit")
    except PackageNotFoundError:
        kn_version = None
    state: dict = {"kn_edit_version": kn_version, "code": str(CODE_ROOT), "commit": None, "dirty": None}
    top = _git("rev-parse", "--show-toplevel")
    if top is not None and Path(top).resolve() == CODE_ROOT:
        state["commit"] = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no")
        state["dirty"] = None if status is None else bool(status)
    return state


def start_manifest() -> dict:
    """Taken when a run starts (the code's state then, not after hours of running): version, git, command line."""
    return code_state() | {"command": list(sys.argv), "cwd": os.getcwd(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def machine(device: str | torch.device | None = None) -> dict:
    """The facts about the machine that change timings and float rounding."""
    facts = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
             "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "device": None if device is None else str(device)}  # fmt: skip
    if device is not None and torch.device(device).type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return facts


def write_manifest(folder: Path, provenance: dict | None, config_text: str, device=None, **extra) -> Path:
    """``folder/manifest.json``: ``provenance`` (``start_manifest()`` at the run's start; taken now when None), the
    finishing date, the config (its file in the folder and the sha256 of its text), the machine, and ``extra``."""
    payload = dict(provenance or start_manifest())
    payload |= {"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "config": "config.yaml",
                "config_sha256": hashlib.sha256(config_text.encode("utf-8")).hexdigest(),
                "machine": machine(device)} | extra  # fmt: skip
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return path
