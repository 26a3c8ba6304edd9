"""``realisr serve``: the web app with live dials (Gradio; ``pip install "realisr[ui]"``).

Binds 127.0.0.1 (this machine only) unless ``--host`` says otherwise. One job runs per device at a time; the
others wait in a queue. Uploads live in a per-tab folder that is deleted when the tab closes.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the app to the "
                        "network)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default 7860)")
    p.add_argument("-m", "--model", action="append", default=None, metavar="ID",
                   help="offer only these models (repeatable; default: every registered model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: best available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--sd", default=None,
                   help="SD-2.1-base for the diffusion models: folder or hub id (sets $REALISR_SD for this server)")
    p.add_argument("--max-pixels", type=int, default=4_000_000,
                   help="largest input accepted, width x height (default 4,000,000)")
    p.add_argument("--max-output-pixels", type=int, default=64_000_000,
                   help="largest output produced (default 64,000,000)")
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="largest uploaded file in MB (default 50)")
    p.add_argument("--max-files", type=int, default=32, help="most photos in one upload (default 32)")
    p.add_argument("--queue-size", type=int, default=16, help="most jobs waiting for the device (default 16)")
    p.add_argument("--session-ttl", type=float, default=3600.0,
                   help="seconds after which an idle session's files are deleted even if its tab stays open")


def run(args) -> int:
    from realisr.errors import require

    require("gradio", "ui")
    from realisr.cpu import keep_freed_memory

    keep_freed_memory()  # every render re-allocates big activations on the CPU: reuse them (docs/cpu.md)
    from realisr.ui.app import launch
    from realisr.ui.engine import Engine
    from realisr.ui.estimate import Limits

    limits = Limits(max_pixels=args.max_pixels, max_output_pixels=args.max_output_pixels,
                    max_upload_mb=args.max_upload_mb, max_files=args.max_files)
    if args.sd:
        import os

        from realisr.models.backbone import SD_ENV

        os.environ[SD_ENV] = args.sd  # the weights status shown in the model menu looks there too
    engine = Engine(args.model, device=args.device, dtype=args.dtype, limits=limits,
                    session_ttl=args.session_ttl)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"realisr serve: binding {args.host}: the app is reachable from other machines", file=sys.stderr)
    print(f"realisr serve: http://{args.host}:{args.port}/ (Ctrl+C stops)", file=sys.stderr)
    try:
        launch(engine, host=args.host, port=args.port, block=True, queue_size=args.queue_size)
    finally:
        engine.close()
    return 0
