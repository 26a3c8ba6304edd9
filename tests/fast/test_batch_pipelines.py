"""A list of images in one pipeline call (issue 14): same-size images go through the networks as one batch and
each gets the output it would get alone; the pre/post-processing on the device equals the host path within
its stated tolerance. On the tiny golden SD model (PiSA-SR, OSEDiff) and a small random spandrel model."""

import numpy as np
import pytest
import torch

from helpers import onestep

pytest.importorskip("diffusers")

# A batched convolution sums in another order than a single image's: float32 rounding, amplified by the
# random tiny networks, stays far below one 8-bit level.
BATCH_TOL = 2e-4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with onestep.one_thread():
        yield


@pytest.fixture(scope="module")
def crops(photo):
    a, b = photo[100:132, 200:232], photo[300:332, 50:82]  # same size: one batch
    c = photo[10:30, 10:40]  # another size: its own call
    return a, b, c


def _maxdiff(outs, refs) -> list:
    assert len(outs) == len(refs)
    return [float(np.abs(o.pixels - r.pixels).max()) for o, r in zip(outs, refs)]


def test_pisa_sr_batch_equals_one_by_one_in_both_modes_and_keeps_redial_states(crops):
    pipe = onestep.pisa_pipeline()
    kw = {"process_size": 64}
    outs = pipe(list(crops), **kw)
    assert isinstance(outs, list) and [o.info.get("batch") for o in outs] == [2, 2, None]
    assert max(_maxdiff(outs, [pipe(x, **kw) for x in crops])) < BATCH_TOL
    assert [o.pixels.shape[:2] for o in outs] == [(128, 128), (128, 128), (80, 120)]

    kw.update(lambda_pix=0.5, lambda_sem=1.5, keep_predictions=True)
    outs = pipe(list(crops[:2]), **kw)
    refs = [pipe(x, **kw) for x in crops[:2]]
    assert outs[0].info["mode"] == "adjustable" and outs[0].info["unet_batch"] == 2
    assert max(_maxdiff(outs, refs)) < BATCH_TOL
    redialled = [pipe.redial(o.extras["redial_state"], 1.0, 0.2) for o in outs]  # one state per image
    assert max(_maxdiff(redialled, [pipe.redial(r.extras["redial_state"], 1.0, 0.2) for r in refs])) < BATCH_TOL
    assert float(np.abs(redialled[0].pixels - outs[0].pixels).max()) > 0.01  # it did re-dial


def test_sampling_a_batch_with_one_generator_per_image_equals_one_by_one(crops):
    pipe = onestep.pisa_pipeline()
    a, b, _ = crops
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    outs = pipe([a, b], process_size=64, sample_posterior=True, generator=gens)
    refs = [pipe(x, process_size=64, sample_posterior=True, generator=torch.Generator().manual_seed(s))
            for x, s in ((a, 1), (b, 2))]
    assert max(_maxdiff(outs, refs)) < BATCH_TOL
    with pytest.raises(ValueError, match="3 generators for 2 images"):
        pipe([a, b], generator=[torch.Generator()] * 3)


def test_osediff_batch_equals_one_by_one(crops):
    pipe = onestep.osediff_pipeline()
    outs = pipe(list(crops), prompt="a photo", process_size=64)
    assert max(_maxdiff(outs, [pipe(x, prompt="a photo", process_size=64) for x in crops])) < BATCH_TOL
    assert all(o.info["prompt"] == "a photo" for o in outs)


def test_a_batch_whose_vae_tiles_runs_image_by_image(crops):
    pipe = onestep.pisa_pipeline()
    a, b, _ = crops
    kw = {"process_size": 64, "vae_tile": 8}  # 16x16 latents in 8x8 tiles: the tiled VAE, one image at a time
    outs = pipe([a, b], **kw)
    assert max(_maxdiff(outs, [pipe(x, **kw) for x in (a, b)])) < BATCH_TOL


def test_gan_batch_equals_one_by_one(tmp_path, crops):
    import realisr
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=4)
    save_file(net.state_dict(), str(tmp_path / "compact.safetensors"))
    pipe = realisr.load_pipeline(str(tmp_path / "compact.safetensors"), device="cpu")
    outs = pipe(list(crops), tile=0)
    assert max(_maxdiff(outs, [pipe(x, tile=0) for x in crops])) < 1e-5
    tiled = pipe(list(crops[:2]), tile=16, tile_pad=4)  # the shared tiling cuts every image of a batch alike
    assert max(_maxdiff(tiled, [pipe(x, tile=16, tile_pad=4) for x in crops[:2]])) < 1e-5


def test_processing_on_the_device_matches_the_host_path(crops, photo):
    """``processing="device"`` (the default on GPUs): Pillow's filters as matrices where the images are.
    Stated tolerance: the pre-processed 8-bit image within one 8-bit level, at under 0.5% of its values (where
    Pillow's 22-bit fixed-point weights round the other way); with 16-bit input the whole pipeline agrees to
    0.05 of a level (float rounding only), the final resize back to 4x (resize_flag) included."""
    pipe = onestep.pisa_pipeline()
    a, _, c = crops
    try:
        for x, ps in ((a, 64), (c, 128)):
            t = torch.from_numpy(x.astype(np.float32) / 255).permute(2, 0, 1)[None]
            pipe.processing = "host"
            host = pipe.preprocess(t, process_size=ps)
            pipe.processing = "device"
            dev = pipe.preprocess(t, process_size=ps)
            assert dev.size == host.size and dev.resize_flag == host.resize_flag == (ps == 128)
            diff = (dev.image.cpu() - host.image).abs() * 255
            assert float(diff.max()) <= 1.0 + 1e-3 and float((diff > 1e-3).float().mean()) < 0.005

        deep = photo[100:120, 200:230].astype(np.uint16) * 257 + 77  # 16-bit: no 8-bit rounding anywhere
        outs = {}
        for mode in ("host", "device"):
            pipe.processing = mode
            outs[mode] = pipe(deep, process_size=128)  # 20 px < 128/4: resized up, then back on the device
        assert outs["host"].info["resize_flag"] and outs["host"].pixels.shape == (80, 120, 3)
        assert float(np.abs(outs["device"].pixels - outs["host"].pixels).max()) * 255 < 0.05
    finally:
        pipe.processing = "auto"
    assert pipe.device_processing() is False  # auto on the CPU: the host path
    pipe.processing = "nowhere"
    try:
        with pytest.raises(ValueError, match="processing must be one of"):
            pipe(a, process_size=64)
    finally:
        pipe.processing = "auto"


@pytest.mark.parametrize("method", ["pisa", "osediff"])
def test_compat_official_takes_the_pillow_path_also_when_processing_is_on_the_device(crops, method):
    """compat="official" reproduces the official scripts' 8-bit Pillow path: with ``processing="device"`` the
    output is the host path's, bit for bit; in a batch each image gets the official finishing (k/255 values,
    the official output size) and the redial states keep compat."""
    pipe = onestep.pisa_pipeline() if method == "pisa" else onestep.osediff_pipeline()
    a, b, c = crops
    kw = {"process_size": 128, "compat": "official"}  # 20x30 < 128/4: resized up (resize_flag), PiSA-SR back
    if method == "pisa":
        kw.update(lambda_pix=0.5, keep_predictions=True)
    try:
        pipe.processing = "host"
        host = pipe(c, **kw)
        pipe.processing = "device"
        dev = pipe(c, **kw)
        assert np.array_equal(dev.pixels, host.pixels)
        assert dev.info["compat"] == "official"
        batch = pipe([a, b], **kw)
    finally:
        pipe.processing = "auto"
    singles = [pipe(x, **kw) for x in (a, b)]
    for o, r in zip(batch, singles):
        assert o.info["compat"] == "official" and o.info.get("batch") == 2
        assert o.pixels.shape == r.pixels.shape
        levels = o.pixels * 255
        assert float(np.abs(levels - np.rint(levels)).max()) < 1e-3  # exact 8-bit values
        # batched convolutions round differently (float32); the two 8-bit truncations of the official path (the
        # decoder output, then the colour-fixed image) can turn that into a level each, at a few values
        diff = np.abs(o.pixels - r.pixels) * 255
        assert float(diff.max()) <= 2 + 1e-3 and float((diff > 1e-3).mean()) < 0.01
    if method == "pisa":
        assert all(o.extras["redial_state"].compat == "official" for o in batch + [host])


def test_ccsr_takes_a_list_one_image_at_a_time(crops):
    """CCSR's sampler draws per image: a list runs image by image, each exactly as alone (its own generator)."""
    from helpers import ccsr

    pipe = ccsr.pipeline()
    assert pipe.supports_batch is False
    a, b, _ = crops
    outs = pipe([a, b], process_size=64, generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    refs = [pipe(x, process_size=64, generator=torch.Generator().manual_seed(s)) for x, s in ((a, 3), (b, 4))]
    assert all(np.array_equal(o.pixels, r.pixels) for o, r in zip(outs, refs))
    assert "batch" not in outs[0].info
