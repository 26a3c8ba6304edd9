"""Scale-out of `realisr upscale` (issue 14): the shared batch runner, the journal, 2 CPU processes under
torchrun (gloo) and a local Ray cluster with 2 workers, on a folder of good and bad files.

Every path must write every good file exactly once, byte-identical to a single-process run, report every bad
file with its reason, and resume a killed job without redoing or losing anything (checked with --overwrite,
where skip-existing alone cannot tell what was redone, through output modification times).
"""

import functools
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from realisr.cli.main import main

REPO = Path(__file__).resolve().parents[2]
GOOD = ["deep16.png", "exif.jpg", "grey.png", "img0.png", "img1.png", "img2.png", "rgba.png"]
BAD = {"corrupt.png": "is not an image realisr can read", "empty.png": "is empty (0 bytes)",
       "notimage.jpg": "is not an image realisr can read", "truncated.jpg": "truncated"}


@functools.lru_cache(maxsize=None)
def _icc() -> bytes:
    """An sRGB profile (made once: its header holds the time it was made)."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Good files (8-bit, 16-bit PNG with an ICC profile, RGBA, grey, a JPEG with EXIF) and bad ones."""
    from realisr.io import ImageData, write_image

    d = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    write_image(d / "deep16.png", ImageData(pixels=rng.random((10, 14, 3), dtype=np.float32), bit_depth=16,
                                            icc_profile=_icc()))
    Image.fromarray(rng.integers(0, 256, (9, 11, 4), dtype=np.uint8), "RGBA").save(d / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(d / "grey.png")
    exif = Image.Exif()
    exif[0x010F] = "realisr-test-camera"  # Make
    jpg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)).save(jpg, "JPEG", exif=exif, quality=90)
    (d / "exif.jpg").write_bytes(jpg.getvalue())
    (d / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (d / "empty.png").write_bytes(b"")
    (d / "notimage.jpg").write_text("not an image")
    return d


N_BIG = 16
ARGS = ["-m", "bicubic", "-s", "6"]  # 96 px inputs at x6: slow enough to stop a job midway


@pytest.fixture(scope="module")
def job(mixed, tmp_path_factory):
    """The job folder (the mixed files and 16 larger photos-to-be) and its single-process CLI outputs, which
    every other path must reproduce byte for byte."""
    d = tmp_path_factory.mktemp("job")
    for p in mixed.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    rng = np.random.default_rng(1)
    for i in range(N_BIG):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(d / f"p{i:02d}.png")
    out = tmp_path_factory.mktemp("ref")
    assert main(["-q", "upscale", "-i", str(d), "-o", str(out), *ARGS]) == 1
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    good = GOOD + [f"p{i:02d}.png" for i in range(N_BIG)]
    assert sorted(files) == sorted(f"{Path(n).stem}_out{Path(n).suffix}" for n in good)
    return d, files


def _earlier_outputs(out: Path, names) -> dict:
    """Outputs of an earlier job (stand-ins, ten seconds old): --overwrite must replace each exactly once."""
    out.mkdir(parents=True)
    old = time.time_ns() - 10**10
    for n in names:
        (out / n).write_bytes(b"an earlier job")
        os.utime(out / n, ns=(old, old))
    return {n: old for n in names}


def _mtimes(out: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}


def _journal_lines(out: Path) -> list:
    return [json.loads(x) for f in out.glob(".realisr-journal/*/*.jsonl") for x in f.read_text().splitlines()]


def _outputs(folder: Path) -> dict:
    """Everything in the folder (a journal or a temporary file left over would show up here)."""
    return {p.name: p.read_bytes() if p.is_file() else "folder" for p in folder.iterdir()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def _torchrun(*argv: str, **kw) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(_free_port()), "-m", "realisr", "upscale", *argv]


# -- I/O and journal --------------------------------------------------------------------------------------------
def test_read_image_from_bytes_keeps_what_a_path_keeps(mixed):
    from realisr.errors import InputImageError
    from realisr.io import read_image

    for name in ("deep16.png", "rgba.png", "exif.jpg"):
        a = read_image(mixed / name)
        for source in (a and (mixed / name).read_bytes(), io.BytesIO((mixed / name).read_bytes())):
            b = read_image(source, name=str(mixed / name))
            assert np.array_equal(a.pixels, b.pixels) and a.bit_depth == b.bit_depth
            assert (a.alpha is None) == (b.alpha is None) and (a.alpha is None or np.array_equal(a.alpha, b.alpha))
            assert a.icc_profile == b.icc_profile and a.exif == b.exif and a.info == b.info
    assert read_image((mixed / "deep16.png").read_bytes()).bit_depth == 16
    assert read_image((mixed / "deep16.png").read_bytes()).icc_profile == _icc()
    assert read_image((mixed / "rgba.png").read_bytes()).alpha is not None
    with pytest.raises(InputImageError, match=r"photo\.png is empty"):
        read_image(b"", name="photo.png")


def test_a_killed_job_resumes_with_overwrite_without_redoing_anything(mixed, tmp_path):
    """In one process: the job is stopped after 3 files (the progress callback raises, as Ctrl-C would); the
    re-run with the same settings does only the rest, then the journal goes and the next run is a new job."""
    from realisr.batch import BatchSettings, plan_items, run_job
    from realisr.distributed.journal import JOURNAL_DIR

    out = tmp_path / "out"
    plan = plan_items([str(mixed)], str(out) + "/")
    settings = BatchSettings(model="bicubic", overwrite=True)
    first = run_job(plan.items, settings, plan.out_root)  # a finished job: every output exists
    assert first.counts == {"written": len(GOOD), "skipped": 0, "failed": len(BAD)}
    assert not (out / JOURNAL_DIR).exists()  # a finished job leaves no journal
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    time.sleep(0.05)

    def stop_after_3(event):
        if event.stage == "files" and event.current >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(plan.items, settings, plan.out_root, callback=stop_after_3)
    lines = [json.loads(x) for f in (out / JOURNAL_DIR).glob("*/*.jsonl") for x in f.read_text().splitlines()]
    assert len(lines) == 3
    redone = {Path(x["dst"]).name for x in lines if x["status"] == "written"}
    mid = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert all(mid[n] != before[n] for n in redone)

    second = run_job(plan.items, settings, plan.out_root)
    assert second.resumed == 3
    assert sum(second.run_counts.values()) == len(GOOD) + len(BAD) - 3  # nothing done twice
    assert second.counts == first.counts and [s for s, _ in second.failures] == [s for s, _ in first.failures]
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert all(after[n] == mid[n] for n in redone)  # not redone after the restart
    assert all(after[n] != before[n] for n in after)  # ... and everything else was redone once
    assert not (out / JOURNAL_DIR).exists()
    third = run_job(plan.items, settings, plan.out_root)  # a new job: --overwrite redoes everything
    assert third.resumed == 0 and third.run_counts["written"] == len(GOOD)


def test_an_output_written_but_not_journaled_counts_and_partial_files_go(tmp_path):
    """A kill between an output's rename and its journal line: the start note and the output's time say it was
    written by this job; a kill during the write leaves a temporary file that the resumed job removes."""
    from realisr.batch import ItemResult
    from realisr.distributed.journal import Journal

    out = tmp_path / "out"
    out.mkdir()
    old = out / "old_out.png"
    old.write_bytes(b"from an earlier job")
    os.utime(old, ns=(time.time_ns() - 10**10,) * 2)
    j = Journal(out, {"model": "bicubic"}, worker="rank0")
    j.record(ItemResult("in/a.png", str(out / "a_out.png"), "written"))
    (out / "a_out.png").write_bytes(b"a")
    j.start("in/b.png", str(out / "b_out.png"))
    (out / "b_out.png").write_bytes(b"b")  # written, then killed before its line
    j.start("in/old.png", str(old))  # killed before the new output replaced the old one
    (out / ".old_out.png.x1y2.part").write_bytes(b"half")
    j.start("in/c.png", str(out / "c_out.png"))  # killed before any output
    j.close()
    j2 = Journal(out, {"model": "bicubic"}, worker="rank1")
    assert j2.finished() == {"in/a.png", "in/b.png"}
    assert [s for s, _ in j2.interrupted()] == ["in/c.png", "in/old.png"]
    assert j2.remove_partial_outputs() == 1 and not (out / ".old_out.png.x1y2.part").exists()
    other = Journal(out, {"model": "other"}, worker="rank0")
    assert other.finished() == set() and other.dir != j2.dir  # other settings: another job
    j2.finish()
    assert not j2.dir.exists() and other.dir.exists()
    other.finish()
    assert not (out / ".realisr-journal").exists()


def test_a_recipe_replays_through_the_batch_runner_as_through_the_cli(mixed, tmp_path):
    """`realisr upscale --recipe` and a job whose settings carry the recipe (pickled, as Ray actors get them)
    write the same bytes: the recipe's model, outscale and format; its settings are part of the job's key."""
    import pickle

    from realisr.batch import BatchSettings, plan_items, run_job
    from realisr.recipe import Recipe

    recipe = Recipe(model="lanczos", args={"outscale": 3}, ext="png")
    path = recipe.save(tmp_path / "r.json")
    src = [str(mixed / n) for n in ("img0.png", "rgba.png", "exif.jpg")]
    assert main(["-q", "upscale", "--recipe", str(path), "-i", *src, "-o", str(tmp_path / "cli")]) == 0
    settings = pickle.loads(pickle.dumps(BatchSettings(model="lanczos", fmt="png", recipe=recipe.to_json())))
    plan = plan_items(src, str(tmp_path / "lib"), ext="png")
    summary = run_job(plan.items, settings, plan.out_root)
    assert summary.ok and summary.counts["written"] == 3
    cli, lib = _outputs(tmp_path / "cli"), _outputs(tmp_path / "lib")
    assert sorted(cli) == ["exif_out.png", "img0_out.png", "rgba_out.png"] and cli == lib
    assert Image.open(tmp_path / "lib" / "img0_out.png").size == (48, 36)  # 16x12 at the recipe's x3
    plain = BatchSettings(model="lanczos", fmt="png")
    assert settings.job_key_fields() != plain.job_key_fields()


def test_threads_and_device_do_not_change_the_job_key(tmp_path):
    """A job resumed with another --threads (or on another device) is the same job; its dtype is not."""
    from realisr.cli.main import build_parser
    from realisr.cli.upscale import _settings

    def settings(*extra):
        args = build_parser().parse_args(["upscale", "-m", "lanczos", "-i", "x.png", "-o", str(tmp_path), *extra])
        return _settings(args, note=lambda msg: None)

    one, two = settings("--threads", "1"), settings("--threads", "2", "--device", "cpu")
    assert one.load_args["num_threads"] == 1 and two.load_args["num_threads"] == 2  # the threads do reach the loader
    assert one.job_key_fields() == two.job_key_fields() == settings().job_key_fields()
    assert settings("--fp32").job_key_fields() != settings("--dtype", "bf16").job_key_fields()


def test_import_realisr_imports_neither_ray_nor_torch():
    code = ("import sys, realisr, realisr.batch, realisr.distributed, realisr.cli.upscale; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr


# -- torchrun ----------------------------------------------------------------------------------------------------
def test_torchrun_two_processes_killed_midway_resume_and_write_what_one_process_writes(job, tmp_path):
    """2 processes with --overwrite over outputs of an earlier job; SIGTERM to torchrun (it stops both processes
    mid-image) after 8 journal lines; the same command again finishes the job. Each output is then the
    single-process output, written once: what was done before the kill keeps its file untouched."""
    src, reference = job
    out = tmp_path / "out"
    before = _earlier_outputs(out, reference)
    argv = ["-i", str(src), "-o", str(out), *ARGS, "--overwrite"]
    proc = subprocess.Popen(_torchrun("-q", *argv), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=str(REPO))
    deadline = time.monotonic() + 240
    lines = 0
    while time.monotonic() < deadline and proc.poll() is None:
        lines = sum(f.read_text().count("\n") for f in out.glob(".realisr-journal/*/*.jsonl"))
        if lines >= 8:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert lines >= 8 and proc.returncode != 0, "the job ended before it could be stopped"
    journaled = _journal_lines(out)
    done = {Path(x["dst"]).name for x in journaled if x["status"] == "written"}
    assert len(journaled) < len(BAD) + len(reference)
    mid = _mtimes(out)
    assert all(mid[n] != before[n] for n in done)

    res = subprocess.run(_torchrun(*argv), env=_env(), capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert res.returncode == 1, res.stderr[-3000:]  # the bad files: exit code 1
    assert _outputs(out) == reference  # every good file, byte-identical; no journal, no temporary files
    after = _mtimes(out)
    assert all(after[n] == mid[n] for n in done)  # finished before the kill: not redone
    assert all(after[n] != before[n] for n in after)  # the rest was done by the resumed run
    summary = [x for x in res.stdout.splitlines() if x.startswith("realisr:")]
    n = len(reference) + len(BAD)
    assert len(summary) == 1 and f"{n} image(s) with bicubic: {len(reference)} written, 0 skipped, {len(BAD)} failed" \
        in summary[0] and "on 2 processes" in summary[0]
    assert "resumed an interrupted job" in res.stderr
    for name, why in BAD.items():  # failures of both runs, each once, with the reason
        hits = [x for x in res.stderr.splitlines() if x.startswith("  failed:") and name in x]
        assert len(hits) == 1 and why in hits[0], res.stderr[-3000:]
    from realisr.io import read_image

    deep = read_image(out / "deep16_out.png")
    assert deep.bit_depth == 16 and deep.icc_profile == _icc()
    assert read_image(out / "rgba_out.png").alpha is not None


# -- Ray ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def test_ray_two_workers_interrupted_resume_and_write_what_one_process_writes(ray_cluster, job, tmp_path, capsys):
    """Ray Data with 2 actors, --overwrite over an earlier job's outputs: the API run is interrupted after 2
    results (the driver's Ctrl-C), `realisr upscale --ray` resumes it; the outputs are the single-process
    outputs, each written once, the bad files reported with their reasons."""
    from realisr.distributed import upscale_dataset

    src, reference = job
    out = tmp_path / "out"
    before = _earlier_outputs(out, reference)

    def stop_after_2(event):
        if event.stage == "files" and event.current >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        upscale_dataset([str(src)], str(out), "bicubic", outscale=6, workers=2, overwrite=True,
                        callback=stop_after_2)
    time.sleep(1.0)  # the interrupted job's actors are gone
    journaled = _journal_lines(out)
    done = {Path(x["dst"]).name for x in journaled if x["status"] == "written"}
    assert 2 <= len(journaled) < len(BAD) + len(reference)
    mid = _mtimes(out)
    assert all(mid[n] != before[n] for n in done)

    rc = main(["upscale", "-i", str(src), "-o", str(out), *ARGS, "--overwrite", "--ray", "--workers", "2"])
    cap = capsys.readouterr()
    assert rc == 1
    assert _outputs(out) == reference
    after = _mtimes(out)
    assert all(after[n] == mid[n] for n in done)  # finished before the interruption: not redone
    assert all(after[n] != before[n] for n in after)
    assert f"{len(reference)} written, 0 skipped, {len(BAD)} failed" in cap.out and "on 2 Ray workers" in cap.out
    assert "resumed an interrupted job" in cap.err
    for name, why in BAD.items():
        hits = [x for x in cap.err.splitlines() if x.startswith("  failed:") and name in x]
        assert len(hits) == 1 and why in hits[0], cap.err
    assert main(["-q", "upscale", "-i", str(src), "-o", str(out), *ARGS, "--ray", "--gpus-per-worker", "1"]) == 1
    assert "the Ray cluster has no GPUs" in capsys.readouterr().err
