"""`realisr weights` / `realisr weights fetch`: downloads from a local HTTP server on 127.0.0.1 (never the
internet), SHA-256 verification, installation where realisr looks, and the loud "unverified" path."""

import dataclasses
import functools
import http.server
import re
import socket
import threading

import pytest

from realisr.cli.main import main
from realisr.weights import fetch as fetch_mod


@pytest.fixture()
def served(tmp_path, monkeypatch):
    """A local HTTP server over ``tmp_path/served``; any connection elsewhere fails the test."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    real_connect = socket.socket.connect

    def local_only(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost"):
            raise AssertionError(f"tried to reach {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    monkeypatch.setenv("REALISR_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("REALISR_WEIGHTS_URL", raising=False)
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _declare_official(monkeypatch, name, content):
    """The stand-in served here cannot have the official digest: the test declares its digest as official."""
    import hashlib

    item = fetch_mod.ITEMS[name]
    f = dataclasses.replace(item.files[0], sha256=hashlib.sha256(content).hexdigest())
    monkeypatch.setitem(fetch_mod.ITEMS, name, dataclasses.replace(item, files=(f,)))


def test_fetch_downloads_verifies_and_installs_where_realisr_looks(served, tmp_path, monkeypatch, capsys):
    from realisr.metrics import metric_status

    root, url = served
    content = b"stand-in AlexNet weights " * 1000
    (root / "alexnet-owt-7be5be79.pth").write_bytes(content)
    _declare_official(monkeypatch, "lpips", content)
    assert not metric_status("lpips").available
    assert main(["weights", "fetch", "lpips", "--url-base", url]) == 0
    out = capsys.readouterr().out
    dest = tmp_path / "weights" / "alexnet-owt-7be5be79.pth"
    assert dest.read_bytes() == content
    assert "SHA-256 verified" in out and str(dest) in out
    assert metric_status("lpips").available  # the metric finds it where it was put
    # a second fetch checks the file that is there and downloads nothing
    (root / "alexnet-owt-7be5be79.pth").unlink()
    assert main(["weights", "fetch", "lpips", "--url-base", url]) == 0
    assert "already there, SHA-256 verified" in capsys.readouterr().out
    assert not list((tmp_path / "weights").glob(".*part")) and not (tmp_path / "torch").exists()


def test_a_file_with_the_wrong_sha256_is_not_installed(served, tmp_path, capsys):
    root, url = served
    (root / "vgg16-397923af.pth").write_bytes(b"not the official VGG16")
    assert main(["weights", "fetch", "dists", "--url-base", url]) == 1
    err = capsys.readouterr().err
    assert "SHA-256" in err and "397923af8e79cdbb" in err and "not installed" in err
    assert not (tmp_path / "weights" / "vgg16-397923af.pth").exists()
    assert not list((tmp_path / "weights").glob(".*part"))  # no partial file left behind


def test_unverified_files_say_so_loudly_even_with_q(served, tmp_path, monkeypatch, capsys):
    root, url = served
    (root / "musiq_koniq_ckpt-e95806b9.pth").write_bytes(b"musiq stand-in")
    monkeypatch.setenv("REALISR_WEIGHTS_URL", url)  # the environment variable works like --url-base
    assert main(["-q", "weights", "fetch", "musiq"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "NOT VERIFIED" in captured.err and "musiq_koniq_ckpt-e95806b9.pth" in captured.err
    assert (tmp_path / "weights" / "musiq_koniq_ckpt-e95806b9.pth").is_file()


def test_no_server_is_a_one_line_error(served, capsys):
    _root, url = served
    assert main(["weights", "fetch", "fid", "--url-base", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot download" in err and "--from" in err


def test_pisa_sr_names_its_source_and_installs_from_a_file(served, tmp_path, capsys):
    from realisr.registry import get_spec
    from realisr.weights.official import find_checkpoint

    assert main(["weights", "fetch", "pisa-sr"]) == 1
    err = capsys.readouterr().err
    assert "drive.google.com" in err and "--from" in err
    mine = tmp_path / "Downloads" / "pisa_sr.pkl"
    mine.parent.mkdir()
    mine.write_bytes(b"checkpoint bytes")
    assert main(["weights", "fetch", "pisa-sr", "--from", str(mine)]) == 0
    err = capsys.readouterr().err
    assert "NOT VERIFIED" in err
    assert find_checkpoint(get_spec("pisa-sr")) == tmp_path / "weights" / "pisa_sr.pkl"


def test_sd_base_goes_into_the_hf_cache_realisr_reads(tmp_path, monkeypatch, capsys):
    import shutil

    import huggingface_hub
    from helpers import onestep

    from realisr.models.backbone import SD21_BASE, resolve_sd

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("REALISR_SD", raising=False)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, cache_dir=None, **kw):
        calls.append((repo_id, allow_patterns, cache_dir))
        repo = tmp_path / "hf" / ("models--" + repo_id.replace("/", "--"))
        snap = repo / "snapshots" / "0123abcd"
        shutil.copytree(onestep.sd_dir(), snap)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123abcd")
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_sd()[0] is None
    assert main(["weights", "fetch", "sd-2.1-base"]) == 0
    (repo_id, patterns, cache), = calls
    assert repo_id == SD21_BASE and cache == str(tmp_path / "hf")
    assert set(patterns) >= {"unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*"}
    folder, source = resolve_sd()
    assert folder == tmp_path / "hf" / "models--stabilityai--stable-diffusion-2-1-base" / "snapshots" / "0123abcd"
    assert "HF cache" in source and "Hugging Face cache" in capsys.readouterr().out


def test_the_catalogue_carries_real_digests_and_the_listing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REALISR_WEIGHTS", str(tmp_path / "w"))
    for item in fetch_mod.ITEMS.values():
        for f in item.files:
            m = re.search(r"-([0-9a-f]{8})\.pth$", f.name)
            if f.sha256:
                assert re.fullmatch(r"[0-9a-f]{64}", f.sha256), f.name
                if m and f.name.startswith(("alexnet", "vgg16", "weights-inception")):
                    assert f.sha256.startswith(m.group(1)), f.name  # torch.hub's naming convention
                if f.url and "openaipublic" in f.url:
                    assert f.sha256 in f.url  # OpenAI's CLIP URLs carry the digest
            assert f.url or item.manual, item.name
    assert main(["weights"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in fetch_mod.ITEMS)
    assert "no published SHA-256" in out and "missing" in out
    assert main(["weights", "fetch", "nothing-like-this"]) == 1
    assert "choose from" in capsys.readouterr().err
