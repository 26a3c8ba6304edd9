"""``realisr weights fetch NAME``: download the files users must bring, on an explicit command only.

Every item names its official source. A file is streamed into a temporary file next to its destination, its
SHA-256 is computed while it arrives and compared with the official one, and only then is it renamed into the
place realisr looks for it (:func:`realisr.weights.cache.checkpoints_dir` for metric weights and official
checkpoints, the Hugging Face cache for SD-2.1-base). A file without a published SHA-256 is installed
*unverified*, and the result says so loudly.

Nothing else in realisr downloads anything. ``REALISR_WEIGHTS_URL`` (or ``base_url=``) replaces every
official URL by ``<base>/<file name>`` (a mirror; the tests use a local server); SD-2.1-base goes through
``huggingface_hub`` (``HF_ENDPOINT`` selects a mirror).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import RealisrError, WeightsNotFoundError
from ..progress import report

logger = logging.getLogger(__name__)

__all__ = ["FetchFile", "FetchItem", "FetchResult", "ITEMS", "URL_ENV", "get_item", "fetch", "item_status",
           "destination", "item_for_file"]

URL_ENV = "REALISR_WEIGHTS_URL"


@dataclass(frozen=True)
class FetchFile:
    """One file: its name where realisr looks for it, its official URL and SHA-256 (``None``: none published)."""

    name: str
    url: Optional[str]
    sha256: Optional[str] = None
    size: Optional[int] = None


@dataclass(frozen=True)
class FetchItem:
    """What ``realisr weights fetch NAME`` installs.

    Attributes:
        name: the NAME on the command line.
        what: one line.
        used_by: the metric or model ids that need it.
        files: direct downloads into :func:`realisr.weights.cache.checkpoints_dir`.
        hf_repo: a Hugging Face repository downloaded into the HF cache instead (SD-2.1-base).
        manual: how to get it when no direct URL exists (PiSA-SR's Google Drive folder).
        licence: the licence of the files.
    """

    name: str
    what: str
    used_by: tuple[str, ...]
    files: tuple[FetchFile, ...] = ()
    hf_repo: Optional[str] = None
    manual: str = ""
    licence: str = ""
    hf_include: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class FetchResult:
    """What happened to one file: ``status`` is ``verified``, ``unverified``, ``present`` or ``downloaded``."""

    item: str
    path: Path
    status: str
    sha256: str = ""
    message: str = ""


_TV = "https://download.pytorch.org/models"
_PYIQA = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main"

# SHA-256 values: torchvision and torch-fidelity name their files after the first 8 hex digits of the SHA-256
# (torch.hub's convention); the full digests below agree with those prefixes and with the sizes published
# alongside them. CLIP's RN50.pt URL carries its full SHA-256. The pyiqa and official SR checkpoints have no
# published digest: they are installed unverified (and say so).
ITEMS: dict[str, FetchItem] = {i.name: i for i in (
    FetchItem("lpips", "ImageNet AlexNet (torchvision), the LPIPS backbone", ("lpips",),
              (FetchFile("alexnet-owt-7be5be79.pth", f"{_TV}/alexnet-owt-7be5be79.pth",
                         "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02", 244_408_911),),
              licence="BSD-3-Clause (torchvision)"),
    FetchItem("dists", "ImageNet VGG16 (torchvision), the DISTS backbone", ("dists",),
              (FetchFile("vgg16-397923af.pth", f"{_TV}/vgg16-397923af.pth",
                         "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0", 553_433_881),),
              licence="BSD-3-Clause (torchvision)"),
    FetchItem("fid", "TF FID InceptionV3 ported by torch-fidelity (v0.2.0 release)", ("fid",),
              (FetchFile("weights-inception-2015-12-05-6726825d.pth",
                         "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth",
                         "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2", 95_628_359),),
              licence="Apache-2.0"),
    FetchItem("musiq", "MUSIQ trained on KonIQ-10k (pyiqa's converted official weights)", ("musiq",),
              (FetchFile("musiq_koniq_ckpt-e95806b9.pth", f"{_PYIQA}/musiq_koniq_ckpt-e95806b9.pth"),),
              licence="Apache-2.0 (MUSIQ); pyiqa is PolyForm-Noncommercial"),
    FetchItem("maniqa", "MANIQA trained on PIPAL (pyiqa)", ("maniqa",),
              (FetchFile("MANIQA_PIPAL-ae6d356b.pth", f"{_PYIQA}/MANIQA_PIPAL-ae6d356b.pth"),),
              licence="Apache-2.0 (MANIQA); pyiqa is PolyForm-Noncommercial"),
    FetchItem("clipiqa", "OpenAI CLIP RN50 (TorchScript; only the exact official file is accepted)", ("clipiqa",),
              (FetchFile("RN50.pt", "https://openaipublic.azureedge.net/clip/models/"
                                    "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
                         "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"),),
              licence="MIT (CLIP)"),
    FetchItem("osediff", "OSEDiff's official checkpoint (cswry/OSEDiff, preset/models/osediff.pkl)", ("osediff",),
              (FetchFile("osediff.pkl", "https://github.com/cswry/OSEDiff/raw/main/preset/models/osediff.pkl"),),
              licence="see cswry/OSEDiff"),
    FetchItem("pisa-sr", "PiSA-SR's official checkpoint pisa_sr.pkl (csslc/PiSA-SR)", ("pisa-sr",),
              (FetchFile("pisa_sr.pkl", None),),
              manual="the authors publish it in a Google Drive folder "
                     "(https://drive.google.com/drive/folders/1oLetijWNd59xwJE5oU-eXylQBifxWdss) and on "
                     "BaiduNetdisk (https://pan.baidu.com/s/1wcMVp9vmsDrLnK0yTAH2Ig, pwd: pisa), which a plain "
                     "download cannot fetch: download pisa_sr.pkl in a browser, then run "
                     "`realisr weights fetch pisa-sr --from PATH/pisa_sr.pkl`",
              licence="see csslc/PiSA-SR"),
    FetchItem("sd-2.1-base", "Stable Diffusion 2.1-base in diffusers layout (the backbone of PiSA-SR and OSEDiff)",
              ("pisa-sr", "osediff"), hf_repo="stabilityai/stable-diffusion-2-1-base",
              hf_include=("unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*", "model_index.json"),
              licence="CreativeML Open RAIL++-M (accept it on the hub first)"),
)}


def get_item(name: str) -> FetchItem:
    """Look up an item.

    Raises:
        RealisrError: unknown name (the message lists the names).
    """
    try:
        return ITEMS[name]
    except KeyError:
        raise RealisrError(f"unknown weights {name!r}: choose from {', '.join(ITEMS)} (see `realisr weights`)") \
            from None


def destination(f: FetchFile) -> Path:
    """Where realisr looks for a directly downloaded file."""
    from .cache import checkpoints_dir

    return checkpoints_dir() / f.name


def item_status(item: FetchItem) -> tuple[bool, str]:
    """``(present, where)`` without network access or hashing."""
    if item.hf_repo:
        from ..models.backbone import COMPONENTS, missing_components
        from .cache import find_hf_snapshot

        snap = find_hf_snapshot(item.hf_repo)
        if snap is not None and not missing_components(snap, COMPONENTS):
            return True, str(snap)
        return False, f"not in the Hugging Face cache ({item.hf_repo})"
    paths = [destination(f) for f in item.files]
    return all(p.is_file() for p in paths), ", ".join(str(p) for p in paths)


def item_for_file(file_name: str) -> Optional[str]:
    """The item that installs ``file_name`` (for hints in error messages), or ``None``."""
    for item in ITEMS.values():
        if any(f.name == file_name for f in item.files):
            return item.name
    return None


def _sha256(path: Path) -> str:
    from .cache import sha256_file

    return sha256_file(path)


def _url_for(f: FetchFile, base_url: Optional[str]) -> Optional[str]:
    base = base_url or os.environ.get(URL_ENV)
    if base:
        return base.rstrip("/") + "/" + f.name
    return f.url


def _download(url: str, dest: Path, *, callback, label: str, timeout: float = 30.0) -> str:
    """Stream ``url`` into a temporary file beside ``dest``; return ``(sha256, temp path)``."""
    import urllib.error
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            req = urllib.request.Request(url, headers={"User-Agent": "realisr"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                total = resp.headers.get("Content-Length")
                total = int(total) if total and total.isdigit() else None
                done = 0
                report(callback, "download", 0, total, label)
                while True:
                    block = resp.read(1 << 20)
                    if not block:
                        break
                    out.write(block)
                    h.update(block)
                    done += len(block)
                    report(callback, "download", done, total, label)
                if total is None:
                    report(callback, "download", done, done, label)
    except (urllib.error.URLError, OSError, ValueError) as e:
        os.unlink(tmp)
        reason = getattr(e, "reason", None) or e
        raise WeightsNotFoundError(f"cannot download {url} ({reason}): check the network, or download the file "
                                   f"yourself and run `realisr weights fetch ... --from PATH`") from None
    except BaseException:
        os.unlink(tmp)
        raise
    return h.hexdigest(), tmp


def _install(tmp: str, dest: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, dest)


def _check(f: FetchFile, digest: str, origin: str) -> None:
    if f.sha256 and digest != f.sha256:
        raise WeightsNotFoundError(f"{f.name} from {origin} has SHA-256 {digest}, but the official file has "
                                   f"{f.sha256}: not installed (a corrupt or different file)")


def _fetch_file(item: FetchItem, f: FetchFile, *, base_url, source, force, callback) -> FetchResult:
    dest = destination(f)
    if dest.is_file() and not force and source is None:
        digest = _sha256(dest)
        if f.sha256 and digest != f.sha256:
            raise WeightsNotFoundError(f"{dest} exists but is not the official {f.name} (SHA-256 {digest[:12]}..., "
                                       f"expected {f.sha256[:12]}...): run again with --force to replace it")
        return FetchResult(item.name, dest, "present" if f.sha256 else "unverified", digest,
                           "already there" + (", SHA-256 verified" if f.sha256 else ", no official SHA-256 to check"))
    if source is not None:
        src = str(source)
        if src.startswith(("http://", "https://")):
            digest, tmp = _download(src, dest, callback=callback, label=f.name)
        else:
            p = Path(src).expanduser()
            if not p.is_file():
                raise WeightsNotFoundError(f"--from {src}: no such file")
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
            os.close(fd)
            shutil.copyfile(p, tmp)
            digest = _sha256(Path(tmp))
        origin = src
    else:
        url = _url_for(f, base_url)
        if url is None:
            raise WeightsNotFoundError(f"{f.name} has no direct download: {item.manual}")
        digest, tmp = _download(url, dest, callback=callback, label=f.name)
        origin = url
    try:
        _check(f, digest, origin)
    except BaseException:
        os.unlink(tmp)
        raise
    _install(tmp, dest)
    if f.sha256:
        return FetchResult(item.name, dest, "verified", digest, f"SHA-256 verified ({digest[:12]}...)")
    logger.warning("%s: no official SHA-256 is published, so this file was NOT verified (its SHA-256 is %s)",
                   f.name, digest)
    return FetchResult(item.name, dest, "unverified", digest,
                       f"NOT VERIFIED: no official SHA-256 is published for {f.name}; its SHA-256 is {digest}, "
                       f"compare it with a copy you trust")


def _fetch_hf(item: FetchItem, *, callback) -> FetchResult:
    from ..errors import require
    from .cache import find_hf_snapshot, hf_hub_cache

    hub = require("huggingface_hub", "diffusion")
    report(callback, "download", 0, None, item.hf_repo)
    try:
        path = hub.snapshot_download(repo_id=item.hf_repo, allow_patterns=list(item.hf_include),
                                     cache_dir=str(hf_hub_cache()))
    except Exception as e:  # noqa: BLE001 - network, auth (gated licence) and disk errors alike
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsNotFoundError(f"cannot download {item.hf_repo} ({type(e).__name__}: {first[:200]}); "
                                   f"accept its licence on huggingface.co and log in (`hf auth login`) if asked, "
                                   f"or run `hf download {item.hf_repo} --include ...` (docs/weights.md)") from None
    snap = find_hf_snapshot(item.hf_repo) or Path(path)
    report(callback, "download", 1, 1, item.hf_repo)
    return FetchResult(item.name, snap, "downloaded", "",
                       "in the Hugging Face cache (huggingface_hub checks each file against the hub's hash)")


def fetch(name: str, *, base_url: Optional[str] = None, source=None, force: bool = False,
          callback: Optional[Callable] = None) -> list[FetchResult]:
    """Download (or install from ``source``) the files of one item and verify them.

    Args:
        name: an item of :data:`ITEMS` (``lpips``, ``dists``, ``fid``, ``musiq``, ``maniqa``, ``clipiqa``,
            ``osediff``, ``pisa-sr``, ``sd-2.1-base``).
        base_url: fetch ``<base_url>/<file name>`` instead of the official URLs (default ``$REALISR_WEIGHTS_URL``).
        source: a local file or URL to install instead (items with one file).
        force: download again even if the file is there.
        callback: progress callback (stage ``download``, bytes).

    Returns:
        One :class:`FetchResult` per file.

    Raises:
        WeightsNotFoundError: the download failed, or the file's SHA-256 is not the official one (nothing is
            installed then).
    """
    item = get_item(name)
    if item.hf_repo:
        if source is not None:
            raise RealisrError(f"{name} is a folder from the Hugging Face hub: pass it to upscale with --sd PATH "
                               "instead of installing it with --from")
        return [_fetch_hf(item, callback=callback)]
    if source is not None and len(item.files) != 1:
        raise RealisrError(f"--from installs one file; {name} has {len(item.files)}")
    return [_fetch_file(item, f, base_url=base_url, source=source, force=force, callback=callback)
            for f in item.files]
