"""Fetching public data files into the kn-edit cache (``kn_edit.models.provision.cache_root()/data``)."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from ..errors import DataError
from ..storage.atomic import atomic_file
from ..models.provision import cache_root


def data_cache(name: str) -> Path:
    """The cache folder of data set ``name``."""
    return cache_root() / "data" / name


def fetch(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically (a failed download leaves nothing behind).

    Raises FileNotFoundError for a missing file (HTTP 404 / no such local file), DataError for other failures.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise FileNotFoundError(url) from exc
        raise DataError(f"could not download {url}: HTTP {exc.code}") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, FileNotFoundError):
            raise FileNotFoundError(url) from exc
        raise DataError(f"could not download {url}: {exc.reason}; give a local copy instead") from exc
    except OSError as exc:
        raise DataError(f"could not download {url}: {exc}; give a local copy instead") from exc
    with atomic_file(dest, overwrite=True) as tmp:
        tmp.write_bytes(payload)
    return dest
