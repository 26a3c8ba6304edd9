"""``realisr weights``: list the weight files users bring; ``realisr weights fetch NAME ...`` downloads them
(the only command that downloads anything), verifies their SHA-256 and says where they went.

    realisr weights                          # what each item is, who needs it, whether it is here
    realisr weights fetch lpips dists fid    # metric backbones into the checkpoints folder
    realisr weights fetch sd-2.1-base        # SD-2.1-base into the Hugging Face cache
    realisr weights fetch pisa-sr --from ~/Downloads/pisa_sr.pkl
"""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("action", nargs="?", default="list", choices=("list", "fetch"),
                   help="list (default) or fetch")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="items to fetch: lpips, dists, fid, musiq, maniqa, clipiqa, osediff, pisa-sr, sd-2.1-base")
    p.add_argument("--from", dest="source", default=None, metavar="PATH_OR_URL",
                   help="install this file (or URL) as the item's file, verified like a download")
    p.add_argument("--url-base", default=None, metavar="URL",
                   help="a mirror: fetch URL/<file name> instead of the official URLs ($REALISR_WEIGHTS_URL)")
    p.add_argument("--force", action="store_true", help="download again even if the file is there")


def _list() -> int:
    from realisr.weights.fetch import ITEMS, item_status

    w = max(len(n) for n in ITEMS)
    for item in ITEMS.values():
        ok, where = item_status(item)
        check = ("no published SHA-256" if item.files and not all(f.sha256 for f in item.files)
                 else "SHA-256 checked" if item.files else "huggingface_hub")
        print(f"{item.name:<{w}}  {'here' if ok else 'missing':<7}  {item.what} [{check}; used by "
              f"{', '.join(item.used_by)}]")
        print(f"{'':<{w}}  {'':<7}  {'' if ok else '-> '}{where}")
    print("fetch with: realisr weights fetch NAME [NAME ...]", file=sys.stderr)
    return 0


def run(args) -> int:
    from realisr.errors import RealisrError
    from realisr.progress import TqdmProgress
    from realisr.weights.fetch import fetch, get_item

    if args.action == "list":
        if args.names:
            raise RealisrError("`realisr weights` lists everything; to download use `realisr weights fetch NAME`")
        return _list()
    if not args.names:
        raise RealisrError("name what to fetch, e.g. `realisr weights fetch lpips` (`realisr weights` lists them)")
    for name in args.names:
        get_item(name)  # unknown names fail before any download
    if args.source and len(args.names) != 1:
        raise RealisrError("--from installs one file: name one item")
    quiet = getattr(args, "quiet", False)
    progress = TqdmProgress(disable=quiet, leave_stages=())
    unverified = []
    try:
        for name in args.names:
            for r in fetch(name, base_url=args.url_base, source=args.source, force=args.force, callback=progress):
                if r.status == "unverified":
                    unverified.append(r)
                elif not quiet:
                    print(f"{name}: {r.path} ({r.message})")
    finally:
        progress.close()
    for r in unverified:  # loud even under -q: the user must know this file was not checked
        print(f"WARNING {r.item}: {r.path}: {r.message}", file=sys.stderr)
    return 0
