"""`realisr serve` in a real browser (Playwright driving the system's Chromium), on PiSA-SR with the golden
fixture's tiny SD model and official-format checkpoint, found through REALISR_WEIGHTS / REALISR_SD as a user's
would be.

upload -> result -> move a dial -> the image changes with no UNet call (counted on the UNet's forward) ->
the download equals `realisr upscale --recipe` on the downloaded settings; the brush paints a spatial map;
a too-large image is refused with the reason; the session's files go when the page closes; the batch tab
returns one zip.
"""

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("gradio", reason="pip install 'realisr[ui]'")

from helpers.browser import browser, free_port, wait_until  # noqa: E402
from helpers.onestep import golden_dir, sd_dir  # noqa: E402

from realisr.cli.main import main  # noqa: E402
from realisr.io import ImageData, read_image, write_image  # noqa: E402
from realisr.recipe import Recipe, decode_mask  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CAP = 6000  # the server's pixel cap in these tests
T = 60_000  # ms: generous bounds for a shared 2-core machine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from realisr.ui.app import launch
    from realisr.ui.engine import Engine
    from realisr.ui.estimate import Limits

    root = tmp_path_factory.mktemp("serve")
    weights = root / "weights"
    weights.mkdir()
    (weights / "pisa_sr.pkl").symlink_to(golden_dir() / "pisa_sr.pkl")
    saved = {k: os.environ.get(k) for k in ("REALISR_WEIGHTS", "REALISR_SD")}
    os.environ["REALISR_WEIGHTS"] = str(weights)
    os.environ["REALISR_SD"] = str(sd_dir())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # (memory refusals depend on what the shared machine has free: tested with fixed numbers in test_serve_engine)
    engine = Engine(["pisa-sr", "bicubic"], device="cpu", limits=Limits(max_pixels=CAP, check_memory=False),
                    root=root / "sessions")
    pipe = engine.pipeline("pisa-sr")  # loaded before the browser starts (as on a server's first request)
    calls = []
    forward = pipe.unet.forward

    def counting(*a, **k):
        calls.append(a[0].shape if a else None)
        return forward(*a, **k)

    pipe.unet.forward = counting
    port = free_port()
    demo = launch(engine, host="127.0.0.1", port=port, block=False)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "engine": engine, "calls": calls, "root": root}
    finally:
        demo.close()
        engine.close()
        pipe.unet.forward = forward
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def chrome():
    with browser() as b:
        yield b


def _photo(path: Path, size=(36, 44), bits: int = 8, seed: int = 0) -> np.ndarray:
    """A smooth random photo-like image (as the CLI tests use), 8- or 16-bit PNG."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.random((6, 7, 3)).astype(np.float32)).permute(2, 0, 1)[None]
    img = torch.nn.functional.interpolate(small, size=size, mode="bicubic").clamp(0, 1)[0].permute(1, 2, 0).numpy()
    peak = 65535 if bits == 16 else 255
    q = np.round(img * peak) / peak
    write_image(path, ImageData(pixels=q.astype(np.float32), bit_depth=bits), overwrite=True)
    return q


def _open(chrome, server):
    page = chrome.new_page(viewport={"width": 1400, "height": 1400}, accept_downloads=True)
    page.set_default_timeout(T)
    page.goto(server["url"])
    page.wait_for_selector("#upload input[type=file]", state="attached")
    return page


def _upload(page, path: Path, *, expect: str = "Output"):
    page.set_input_files("#upload input[type=file]", str(path))
    page.wait_for_function(f"document.querySelector('#estimate').innerText.includes({expect!r})", timeout=T)


def _set_number(page, elem_id: str, value):
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _open_accordion(page, elem_id: str):
    page.click(f"#{elem_id} button.label-wrap")


def _srcs(page) -> list:
    return page.eval_on_selector_all("#result img", "els => els.map(e => e.src)")


def _run(page, calls) -> list:
    n = len(calls)
    before = _srcs(page)
    page.click("#run")
    page.wait_for_function(f"(() => {{ const s = Array.from(document.querySelectorAll('#result img')).map(e => e.src);"
                           f" return s.length >= 2 && s.join() !== {json.dumps(','.join(before))}; }})()", timeout=T)
    assert "full run" in page.inner_text("#run-info")
    assert len(calls) == n + 1  # one batched UNet call (eps_pix and eps_PiSA), the image fits one latent tile
    return _srcs(page)


def _wait_new(page, old: list):
    page.wait_for_function(f"Array.from(document.querySelectorAll('#result img')).map(e => e.src).join() !== "
                           f"{json.dumps(','.join(old))}", timeout=T)


def _download(page, elem_id: str, dst: Path) -> Path:
    with page.expect_download(timeout=T) as d:
        page.click(f"#{elem_id}")
    d.value.save_as(dst)
    return dst


def _screenshot(page, dst: Path, clip: dict) -> None:
    """A small PNG of the page (halved, 256-colour palette) for the docs."""
    from PIL import Image

    raw = dst.with_suffix(".raw.png")
    page.screenshot(path=str(raw), clip=clip, full_page=True)  # clip in page coordinates
    with Image.open(raw) as im:
        small = im.convert("RGB").resize((im.width // 2, im.height // 2), Image.LANCZOS)
    small.quantize(256).save(dst, optimize=True)
    raw.unlink()


def _cli_replay(recipe: Path, src: Path, out: Path) -> Path:
    assert main(["upscale", "-q", "--recipe", str(recipe), "-i", str(src), "-o", str(out)]) == 0
    return out


def _start(chrome, server, src: Path):
    """A page with ``src`` uploaded and PiSA-SR's processing size at the tiny model's 64 (a full-run setting)."""
    page = _open(chrome, server)
    _upload(page, src)
    _open_accordion(page, "advanced")
    _set_number(page, "dial-process_size", 64)
    return page


def test_dial_redials_without_unet_and_download_equals_the_cli(server, chrome, tmp_path):
    calls = server["calls"]
    src = tmp_path / "photo16.png"
    _photo(src, bits=16)
    page = _start(chrome, server, src)
    assert "pisa-sr" in page.inner_text("#model-status") and "Weights: ready" in page.inner_text("#model-status")
    first = _run(page, calls)
    plain = read_image(_download(page, "download", tmp_path / "first.png"))
    n = len(calls)

    _set_number(page, "dial-lambda_sem", 1.5)  # a cheap dial: re-rendered from the kept predictions
    _wait_new(page, first)
    assert "re-dial" in page.inner_text("#run-info")
    assert len(calls) == n  # no UNet call
    dl = _download(page, "download", tmp_path / "photo16_out.png")
    recipe = _download(page, "download-recipe", tmp_path / "settings.json")
    got = read_image(dl)
    assert got.bit_depth == 16 and got.pixels.shape == (144, 176, 3)  # 16 bits kept, exactly 4x
    assert np.abs(got.pixels - plain.pixels).mean() > 1e-3  # the dial changed the image

    r = Recipe.load(recipe)
    assert r.model == "pisa-sr" and r.args["lambda_sem"] == 1.5 and r.args["process_size"] == 64
    assert not any(str(server["root"]) in str(v) for v in r.to_json().values())  # no server paths
    cli = read_image(_cli_replay(recipe, src, tmp_path / "cli.png"))
    assert cli.bit_depth == 16
    assert np.array_equal(cli.pixels, got.pixels)  # the download is exactly what the CLI writes
    assert len(calls) == n  # the CLI ran its own pipeline, not the server's

    # the synced 1:1 magnifier follows the pointer over the slider
    box = page.locator("#result img").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.5)
    page.mouse.move(box["x"] + box["width"] * 0.26, box["y"] + box["height"] * 0.5)
    lens = page.eval_on_selector_all("#loupe .lens", "els => els.map(e => [e.style.backgroundSize, e.dataset.x])")
    assert lens[0] == lens[1] and lens[0][0] == "176px 144px"  # both at their own pixel size, same spot
    if os.environ.get("REALISR_UPDATE_SCREENSHOTS"):  # the README's screenshot
        _screenshot(page, REPO / "docs" / "serve.png", {"x": 0, "y": 0, "width": 1400, "height": 1000})
    page.close()


def test_brush_paints_a_spatial_map(server, chrome, tmp_path):
    calls = server["calls"]
    src = tmp_path / "photo.png"
    _photo(src, seed=1)
    page = _start(chrome, server, src)
    _run(page, calls)
    plain = read_image(_download(page, "download", tmp_path / "plain.png")).pixels
    n = len(calls)
    _open_accordion(page, "paint")
    page.wait_for_selector("#brush canvas")
    assert page.input_value("#brush-value input[type=number]") == "0"  # lambda_sem (the default) = 0 inside
    old = _srcs(page)
    canvas = page.locator("#brush canvas").first.bounding_box()
    # the canvas letterboxes the 44x36 image: paint a stroke over the middle of its right half
    cx, cy = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2
    scale = min(canvas["width"] / 44, canvas["height"] / 36)
    page.mouse.move(cx + 8 * scale, cy - 6 * scale)
    page.mouse.down()
    for i in (3, 6, 9, 12):  # few pointer events: each one redraws the canvas (slow in a software-rendered browser)
        page.mouse.move(cx + 8 * scale + i * scale, cy - 6 * scale + i * scale)
    page.mouse.up()
    _wait_new(page, old)
    wait_until(lambda: "re-dial" in page.inner_text("#run-info"), what="a re-dial")
    assert len(calls) == n  # painting re-renders without a UNet call
    recipe = Recipe.load(_download(page, "download-recipe", tmp_path / "painted.json"))
    assert set(recipe.maps) == {"lambda_sem"} and recipe.maps["lambda_sem"]["inside"] == 0.0
    mask = decode_mask(recipe.maps["lambda_sem"]["mask_png"])
    assert mask.shape == (36, 44)
    ys, xs = np.nonzero(mask)
    assert len(xs) > 20 and xs.min() >= 22 and 8 < ys.mean() < 30  # the stroke, in the right half
    painted = read_image(_download(page, "download", tmp_path / "painted.png")).pixels
    diff = np.abs(painted - plain).mean(axis=2)
    inside = np.kron(mask > 0, np.ones((4, 4), bool))
    assert diff[inside].mean() > 3 * diff[:, :40].mean()  # the image changed where the map did
    cli = read_image(_cli_replay(tmp_path / "painted.json", src, tmp_path / "cli.png")).pixels
    assert np.array_equal(cli, painted)  # the CLI replays the painted map exactly
    page.close()


def test_too_large_image_is_refused_with_the_reason(server, chrome, tmp_path):
    calls = server["calls"]
    big = tmp_path / "big.png"
    _photo(big, size=(80, 90))  # 7200 pixels > CAP
    page = _open(chrome, server)
    _upload(page, big, expect="Refused")
    text = page.inner_text("#estimate")
    assert "big.png is 90 x 80 = 7,200 pixels, over this server's limit of 6,000 pixels" in text
    n = len(calls)
    page.click("#run")
    toast = page.wait_for_selector(".toast-body", timeout=T)
    assert "over this server's limit" in toast.inner_text()
    assert len(calls) == n and not _srcs(page)
    assert str(server["root"]) not in page.content()  # no server paths on the page
    page.close()


def test_session_files_are_deleted_when_the_page_closes(server, chrome, tmp_path):
    engine = server["engine"]
    src = tmp_path / "bye.png"
    _photo(src, seed=2)
    known = set(engine.sessions)
    page = _open(chrome, server)
    _upload(page, src)
    key = wait_until(lambda: next(iter(set(engine.sessions) - known), None), what="a new session")
    s = engine.sessions[key]
    copy, original = s.uploads["1"].path, Path(s.originals[0])
    assert copy.is_file() and original.is_file()
    page.close()
    wait_until(lambda: key not in engine.sessions, timeout=60, what="the session to close")
    assert not copy.exists() and not s.folder.exists() and not original.exists()


def test_batch_tab_returns_one_zip(server, chrome, tmp_path):
    srcs = [tmp_path / "a.png", tmp_path / "b.png"]
    for i, p in enumerate(srcs):
        _photo(p, seed=10 + i)
    page = _open(chrome, server)
    _open_accordion(page, "advanced")
    _set_number(page, "dial-process_size", 64)
    page.click("button[role=tab]:has-text('Batch')")
    page.set_input_files("#batch-upload input[type=file]", [str(p) for p in srcs])
    wait_until(lambda: "2 photo(s) ready" in page.inner_text("#batch-info"), what="the batch upload")
    page.click("#batch-run")
    wait_until(lambda: "2 of 2 done" in page.inner_text("#batch-info"), timeout=T / 1000, what="the batch")
    z = _download(page, "batch-zip", tmp_path / "batch.zip")
    with zipfile.ZipFile(z) as f:
        assert sorted(f.namelist()) == ["a_out.png", "b_out.png", "recipe.json"]
        f.extractall(tmp_path / "unzipped")
    out = read_image(tmp_path / "unzipped" / "a_out.png").pixels
    assert out.shape == (144, 176, 3)
    cli = read_image(_cli_replay(tmp_path / "unzipped" / "recipe.json", srcs[0], tmp_path / "cli_a.png")).pixels
    assert np.array_equal(cli, out)
    page.close()
    shutil.rmtree(tmp_path / "unzipped")


def test_the_cli_serves_on_localhost(tmp_path):
    """`realisr serve` as a user starts it: binds 127.0.0.1 by default and serves the app until stopped."""
    import subprocess
    import sys
    import urllib.request

    from helpers.browser import wait_http

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "realisr", "serve", "-m", "bicubic", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/", timeout=120, proc=proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as r:
            config = json.loads(r.read())
        ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
        assert {"upload", "model", "run", "cancel", "result", "download", "download-recipe", "dial-outscale"} <= ids
        assert "dial-lambda_sem" not in ids  # bicubic only: no PiSA-SR dials
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert f"http://127.0.0.1:{port}/" in (tmp_path / "serve.log").read_text()
