"""Tiled VAE encode/decode (realisr.models.tiled_vae) against the plain diffusers AutoencoderKL.

A tiny SD-shaped VAE (4 levels, so the x8 geometry and the alignment of the encoder tiles are exercised; few
channels so it is quick). Tolerances were measured on this model: with global GroupNorm statistics and global
attention the only approximation is the conv receptive field beyond ``pad``; with ``pad`` >= that field
(about 12 latents / 80 px for this config) tiled equals untiled to ~1e-6, and the tests allow 1e-4.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from realisr.models.tiled_vae import partition, tiled_decode, tiled_encode  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny convs here gain nothing from threads, and on a shared CPU oversubscribed threads make them ~10x
    slower; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                          latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4,
                          up_block_types=["UpDecoderBlock2D"] * 4).eval()
    # random init leaves GroupNorm affine at (1, 0); perturb it so the affine path is tested too
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, max(2, h // 8), max(2, w // 8), generator=g) * 2 - 1
    img = torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)
    return (img + 0.1 * torch.randn(1, 3, h, w, generator=g)).clamp(-1, 1)


def _latent(h, w, seed=1):
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed))


def test_partition_covers_every_pixel_once_with_aligned_cuts():
    tiles = partition(100, 70, 32, 20, align=8)
    cover = torch.zeros(100, 70, dtype=torch.int64)
    for (y0, y1, x0, x1), (cy0, cy1, cx0, cx1) in tiles:
        cover[y0:y1, x0:x1] += 1
        assert cy0 <= y0 and cy1 >= y1 and cx0 <= x0 and cx1 >= x1
        assert y0 % 8 == 0 and x0 % 8 == 0 and cy0 % 8 == 0 and cx0 % 8 == 0
        assert cy0 == max(0, y0 - 24) and cy1 == min(100, y1 + 24)  # pad rounded up to a multiple of 8
    assert torch.all(cover == 1)
    assert len(tiles) > 4


def test_single_tile_equals_plain_diffusers_exactly(vae):
    x = _image(48, 40)
    z = _latent(6, 5)
    with torch.no_grad():
        ref_post = vae.encode(x).latent_dist
        ref_dec = vae.decode(z).sample
    post = tiled_encode(vae, x, tile=64)
    assert torch.equal(post.mean, ref_post.mean) and torch.equal(post.logvar, ref_post.logvar)
    assert torch.equal(tiled_decode(vae, z, tile=None), ref_dec)
    assert torch.equal(tiled_decode(vae, z, tile=6), ref_dec)


def test_tiled_encode_matches_untiled(vae):
    x = _image(96, 80)
    with torch.no_grad():
        ref = vae.encode(x).latent_dist
    events = []
    post = tiled_encode(vae, x, tile=48, pad=80, callback=events.append)
    assert post.mean.shape == ref.mean.shape
    assert (post.mean - ref.mean).abs().max() < TOL
    assert (post.logvar - ref.logvar).abs().max() < TOL
    assert events[-1].stage == "vae_encode" and events[-1].current == events[-1].total > 4
    # the posterior can be sampled reproducibly by the caller
    s1 = post.sample(generator=torch.Generator().manual_seed(3))
    s2 = post.sample(generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and not torch.equal(s1, post.mean)


def test_tiled_decode_matches_untiled(vae):
    z = _latent(20, 16)
    with torch.no_grad():
        ref = vae.decode(z).sample
    events = []
    out = tiled_decode(vae, z, tile=8, pad=12, callback=events.append)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.shape == ref.shape == (1, 3, 160, 128)
    assert (out - ref).abs().max() < TOL
    assert events[-1].stage == "vae_decode" and events[-1].current == events[-1].total


def _seam_jump(img, cuts_y, cuts_x):
    """Mean |difference| between the two pixel rows/columns on either side of each cut."""
    jumps = [(img[..., c, :] - img[..., c - 1, :]).abs().mean() for c in cuts_y]
    jumps += [(img[..., :, c] - img[..., :, c - 1]).abs().mean() for c in cuts_x]
    return torch.stack(jumps)


def test_no_seam_band(vae):
    """With a pad below the receptive field the result is approximate, but the seams do not show.

    The comparison baseline is the naive way (decode every tile on its own, with its own GroupNorm statistics
    and attention, and stitch), which the same metrics flag, so they can see seams.
    """
    z = _latent(40, 10, seed=5)
    with torch.no_grad():
        ref = vae.decode(z).sample
    tiles = partition(40, 10, 10, 10)
    assert len(tiles) == 4  # a column of 4 tiles; cores meet at latent rows 10, 20, 30
    cuts = [80, 160, 240]
    band = torch.cat([torch.arange(c - 8, c + 8) for c in cuts])

    def band_err(img):
        return (img - ref)[..., band, :].abs().mean()

    def jumps(img):  # mean |step| between the two pixel rows on either side of each cut
        return torch.stack([(img[..., c, :] - img[..., c - 1, :]).abs().mean() for c in cuts])

    out = tiled_decode(vae, z, tile=10, pad=10)
    naive = torch.zeros_like(ref)
    with torch.no_grad():
        for (y0, y1, x0, x1), (cy0, cy1, cx0, cx1) in tiles:
            tile = vae.decode(z[..., cy0:cy1, cx0:cx1]).sample
            naive[..., y0 * 8:y1 * 8, x0 * 8:x1 * 8] = tile[..., (y0 - cy0) * 8:(y1 - cy0) * 8,
                                                            (x0 - cx0) * 8:(x1 - cx0) * 8]
    assert band_err(out) < 0.05 * band_err(naive)
    # the step across each seam is the reference's step (the image's own content), within a few percent
    assert torch.allclose(jumps(out), jumps(ref), rtol=0.05)
    assert (jumps(naive) - jumps(ref)).abs().max() > 5 * (jumps(out) - jumps(ref)).abs().max()
    # and the error near the seams is not larger than away from them
    away = torch.tensor([r for r in range(out.shape[-2]) if r not in set(band.tolist())])
    assert band_err(out) < 3 * (out - ref)[..., away, :].abs().mean() + TOL


def test_odd_sizes(vae):
    # latents not a multiple of the tile: output is exactly 8x
    z = _latent(13, 11, seed=2)
    with torch.no_grad():
        ref = vae.decode(z).sample
    out = tiled_decode(vae, z, tile=6, pad=12)
    assert out.shape == (1, 3, 104, 88)
    assert (out - ref).abs().max() < TOL
    # an image that is not a multiple of 8: same latent size and values as the plain encoder
    x = _image(100, 90, seed=4)
    with torch.no_grad():
        ref_mean = vae.encode(x).latent_dist.mean
    post = tiled_encode(vae, x, tile=48, pad=80)
    assert post.mean.shape == ref_mean.shape == (1, 4, 12, 11)
    assert (post.mean - ref_mean).abs().max() < TOL


def test_attention_modes(vae):
    z = _latent(16, 16, seed=6)
    with torch.no_grad():
        ref = vae.decode(z).sample
    exact = (tiled_decode(vae, z, tile=8, pad=12) - ref).abs().max()
    local = (tiled_decode(vae, z, tile=8, pad=12, attention="tile") - ref).abs().max()
    skipped = (tiled_decode(vae, z, tile=8, pad=12, attention="none") - ref).abs().max()
    assert exact < TOL
    assert skipped > 10 * TOL  # skipping attention changes the model's output
    assert local < skipped
    with pytest.raises(ValueError, match="attention"):
        tiled_decode(vae, z, tile=8, attention="bogus")


def test_bf16_runs_with_fp32_statistics(vae):
    import copy

    z = _latent(16, 12, seed=7)
    with torch.no_grad():
        ref = vae.decode(z).sample
    half = copy.deepcopy(vae).to(torch.bfloat16)
    out = tiled_decode(half, z, tile=8, pad=12)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # bf16 has ~3 significant digits; the decoder output is O(1)
    assert (out - ref).abs().mean() < 0.05


def test_lora_wrapped_encoder(vae):
    """OSEDiff's VAE-encoder LoRA (peft wrappers around every encoder conv, unmerged) tiles like the plain VAE."""
    import copy

    pytest.importorskip("peft")
    from realisr.models import lora

    wrapped = copy.deepcopy(vae)
    lora.add_lora_adapter(wrapped, lora.OSEDIFF_VAE_ADAPTER, lora.vae_encoder_lora_target_modules(wrapped), 2)
    lora.set_active_adapters(wrapped, [lora.OSEDIFF_VAE_ADAPTER])
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    assert len(list(lora.lora_layers(wrapped))) > 10
    x = _image(64, 64, seed=8)
    with torch.no_grad():
        ref = wrapped.encode(x).latent_dist.mean
        plain = vae.encode(x).latent_dist.mean
    out = tiled_encode(wrapped, x, tile=32, pad=80).mean
    assert (out - ref).abs().max() < TOL
    assert (ref - plain).abs().max() > 100 * TOL  # the adapter is really applied
