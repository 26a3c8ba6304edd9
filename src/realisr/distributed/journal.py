"""The journal of a batch job: what each worker finished, so that a killed job resumes without redoing or
losing anything.

A job writes ``<output>/.realisr-journal/<job key>/<worker>.jsonl``: one JSON line per finished input
(``written``, ``skipped`` or ``failed`` with its reason), appended and pushed to disk (``fsync``) before the
next input starts. Every worker (a torchrun / accelerate process, a Ray actor, the single CLI process) has its
own file, so lines never interleave and no lock is needed. The job key is a hash of everything that decides
the outputs (model, settings, ``--overwrite``; not the device or the number of workers): a re-run with the same
settings resumes the same journal, with any number of workers; other settings start a fresh one beside it.

Resume rule: an input with a complete line is finished (a line cut by a kill does not count), unless the
line says ``written`` and the output is gone; finished inputs are not redone, and failures keep their reason
for the combined summary. A kill can fall between an output's atomic rename and its journal line; so a worker
also notes when it *starts* an input (``<worker>.started``), and an input started but without a line whose
output is newer than that start (less a second of clock slack) was written by this job: it counts as
``written`` and is not redone either, ``--overwrite`` or not. When a job completes (every input has its line), its journal is removed: the next
run with the same settings is a new job (``--overwrite`` then redoes everything, as asked).

Why a journal and not only "skip outputs that exist": outputs are written atomically, so an existing output is
complete, which covers a plain re-run. With ``--overwrite`` it does not: every output exists (from an earlier
job) and a resumed job must still skip the ones it already redid. The journal is also what the combined
summary and progress of many workers are computed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict
from glob import escape as glob_escape
from pathlib import Path

from ..batch import ItemResult

logger = logging.getLogger(__name__)

__all__ = ["Journal", "JOURNAL_DIR", "job_key"]

JOURNAL_DIR = ".realisr-journal"
_CLOCK_SLACK_NS = 1_000_000_000  # file times come from a coarser clock than time.time_ns()


def job_key(settings: dict) -> str:
    """A short stable hash of the settings that decide a job's outputs."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Journal:
    """One worker's view of a job's journal (it appends to its own file and reads everyone's).

    Args:
        output_root: the job's output folder.
        settings: what decides the outputs (hashed into the job key; stored in ``job.json``).
        worker: this worker's name (made a file name: letters, digits, ``-``, ``_`` and ``.``).
    """

    def __init__(self, output_root, settings: dict, worker: str):
        self.key = job_key(settings)
        self.root = Path(output_root) / JOURNAL_DIR
        self.dir = self.root / self.key
        self.worker = re.sub(r"[^A-Za-z0-9._-]", "_", worker) or "worker"
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "job.json"
        if not meta.exists():
            tmp = meta.with_name(f".job.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"settings": settings, "created": time.time()}, indent=1, default=str))
            os.replace(tmp, meta)
        self._fh = None
        self._sfh = None
        self._seen: dict = {}  # file -> (bytes read, complete lines): count() reads only what was appended

    @property
    def path(self) -> Path:
        return self.dir / f"{self.worker}.jsonl"

    def record(self, result: ItemResult) -> None:
        """Append one result and push it to disk before returning."""
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        result.worker = result.worker or self.worker
        self._fh.write(json.dumps(asdict(result)) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def start(self, src: str, dst: str) -> None:
        """Note that an input starts (flushed, not synced: a lost note only means the input is redone)."""
        if self._sfh is None:
            self._sfh = open(self.dir / f"{self.worker}.started", "a", encoding="utf-8")
        self._sfh.write(json.dumps({"src": src, "dst": dst, "t_ns": time.time_ns()}) + "\n")
        self._sfh.flush()

    def close(self) -> None:
        for name in ("_fh", "_sfh"):
            fh = getattr(self, name)
            if fh is not None:
                fh.close()
                setattr(self, name, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- reading ---------------------------------------------------------------------------------------------
    @staticmethod
    def _lines(f: Path):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # the writer was killed mid-line: that input was not finished
                try:
                    yield json.loads(line)
                except ValueError:
                    logger.warning("ignoring a malformed journal line in %s", f)

    def records(self) -> list[ItemResult]:
        """Every complete line of every worker's file (a line cut by a kill is ignored), plus a ``written``
        result for each input started without a line whose output is newer than the start."""
        out: list[ItemResult] = []
        for f in sorted(self.dir.glob("*.jsonl")):
            for d in self._lines(f):
                try:
                    out.append(ItemResult(**d))
                except TypeError:
                    logger.warning("ignoring a malformed journal line in %s", f)
        final = {r.src for r in out}
        started: dict = {}
        for f in sorted(self.dir.glob("*.started")):
            for d in self._lines(f):
                src = d.get("src")
                if src in final or not isinstance(d.get("t_ns"), int):
                    continue
                if src not in started or d["t_ns"] > started[src][1]:
                    started[src] = (str(d.get("dst")), d["t_ns"], f.stem)
        for src, (dst, t_ns, worker) in sorted(started.items()):
            try:
                mtime = os.stat(dst).st_mtime_ns
            except OSError:
                continue
            if mtime >= t_ns - _CLOCK_SLACK_NS:
                out.append(ItemResult(src, dst, "written", None, 0.0, worker))
        return out

    def interrupted(self) -> list[tuple[str, str]]:
        """``(src, dst)`` of the inputs started without a result and without a fresh output: a kill stopped
        them (their writer may have left a temporary ``.NAME.*.part`` file beside ``dst``)."""
        final = {r.src for r in self.records()}
        out = {}
        for f in sorted(self.dir.glob("*.started")):
            for d in self._lines(f):
                if d.get("src") not in final:
                    out[str(d.get("src"))] = str(d.get("dst"))
        return sorted(out.items())

    def remove_partial_outputs(self) -> int:
        """Delete the temporary files that killed writers of this job left (see :meth:`interrupted`)."""
        n = 0
        for _src, dst in self.interrupted():
            d = Path(dst)
            for tmp in d.parent.glob(f".{glob_escape(d.name)}.*.part"):
                try:
                    tmp.unlink()
                    n += 1
                except OSError:
                    pass
        if n:
            logger.info("removed %d temporary file(s) left by an interrupted run", n)
        return n

    def finished(self) -> set[str]:
        """Inputs this job already finished: a resumed job does not redo them. ``written`` counts only while
        its output is still there."""
        last: dict[str, ItemResult] = {}
        for r in self.records():
            last[r.src] = r
        return {src for src, r in last.items() if r.status != "written" or Path(r.dst).exists()}

    def count(self) -> int:
        """Complete lines in all workers' files so far (for a combined progress bar); reads only new bytes."""
        total = 0
        for f in self.dir.glob("*.jsonl"):
            pos, n = self._seen.get(f, (0, 0))
            try:
                with open(f, "rb") as fh:
                    fh.seek(pos)
                    chunk = fh.read()
            except OSError:
                chunk = b""
            end = chunk.rfind(b"\n") + 1  # complete lines only
            n += chunk.count(b"\n", 0, end)
            self._seen[f] = (pos + end, n)
            total += n
        return total

    def finish(self) -> None:
        """Remove the journal of a completed job (and the journal folder when nothing else is in it)."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.root.rmdir()
        except OSError:
            pass  # other jobs' journals are there
