"""Where realisr keeps converted weights, and where it looks for weights users bring.

* Our own cache (converted ncnn weights, converted checkpoints): ``$REALISR_CACHE`` if set, else
  ``$XDG_CACHE_HOME/realisr``, else ``~/.cache/realisr``.
* Hugging Face models (SD-2.1-base ...): the HF hub cache, ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``~/.cache/huggingface/hub`` (the layout ``models--org--name/snapshots/<rev>/``).
* Official checkpoints and metric weights: ``$REALISR_WEIGHTS`` (a folder), else ``<cache>/checkpoints``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Optional

__all__ = ["cache_dir", "hf_hub_cache", "checkpoints_dir", "find_hf_snapshot", "sha256_file", "atomic_save_file"]


def cache_dir() -> Path:
    """realisr's cache folder (created on demand by writers, not here)."""
    env = os.environ.get("REALISR_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "realisr"


def checkpoints_dir() -> Path:
    """Folder searched for checkpoints users bring (``pisa_sr.pkl``, ``osediff.pkl``, metric weights)."""
    env = os.environ.get("REALISR_WEIGHTS")
    return Path(env).expanduser() if env else cache_dir() / "checkpoints"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, following huggingface_hub's environment variables."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME")
    base = Path(home).expanduser() if home else (
        Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "huggingface" if os.environ.get("XDG_CACHE_HOME")
        else Path.home() / ".cache" / "huggingface")
    return base / "hub"


def find_hf_snapshot(repo_id: str, revision: str = "main") -> Optional[Path]:
    """The local snapshot folder of a hub repo in the HF cache, or ``None`` (no network)."""
    root = hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    if not root.is_dir():
        return None
    ref = root / "refs" / revision
    if ref.is_file():
        snap = root / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap
    snaps = sorted((root / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    return snaps[0] if snaps else None


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def atomic_save_file(tensors: dict, path, metadata: Optional[dict] = None) -> Path:
    """Write a safetensors file atomically (temp file in the same folder, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a cache file is as readable as any other
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
