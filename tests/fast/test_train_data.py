"""Training data: sources with repeat weights, txt lists, captions, random crops/flips, LQ made on the fly."""

import json

import pytest
import torch

from realisr.train.data import DataError, HQCropDataset, LQMaker, list_sources, load_captions


@pytest.fixture()
def photos(tmp_path):
    import skimage.data
    from PIL import Image

    a = tmp_path / "a"
    a.mkdir()
    Image.fromarray(skimage.data.astronaut()).resize((96, 80)).save(a / "astronaut.png")
    Image.fromarray(skimage.data.chelsea()).resize((90, 70)).save(a / "sub_chelsea.jpg")
    b = tmp_path / "b"
    b.mkdir()
    Image.fromarray(skimage.data.coffee()).resize((40, 30)).save(b / "coffee.png")
    (tmp_path / "list.txt").write_text("# comment\nb/coffee.png\n\n")
    return tmp_path


def test_sources_repeat_and_txt_lists(photos):
    files = list_sources([str(photos / "a"), {"path": str(photos / "list.txt"), "repeat": 3}])
    names = [f.name for f in files]
    assert names == ["astronaut.png", "sub_chelsea.jpg", "coffee.png", "coffee.png", "coffee.png"]
    assert list_sources([{"path": str(photos / "a"), "repeat": 0}, str(photos / "b")])[0].name == "coffee.png"
    with pytest.raises(DataError, match="not a folder"):
        list_sources([str(photos / "missing")])
    with pytest.raises(DataError, match="no training images"):
        list_sources([])
    with pytest.raises(DataError, match="repeat"):
        list_sources([{"path": str(photos / "a"), "repeat": -1}])


def test_captions(photos):
    tsv = photos / "caps.txt"
    tsv.write_text("astronaut.png\twoman, space suit\ncoffee\tcup\n")
    caps = load_captions(tsv)
    ds = HQCropDataset(list_sources([str(photos / "a"), str(photos / "b")]), crop_size=32, captions=caps)
    assert [ds.caption_for(f) for f in ds.files] == ["woman, space suit", "", "cup"]
    js = photos / "caps.json"
    js.write_text(json.dumps({"sub_chelsea.jpg": "cat"}))
    assert load_captions(js) == {"sub_chelsea.jpg": "cat"}
    (photos / "bad.txt").write_text("no tab here\n")
    with pytest.raises(DataError, match="line 1"):
        load_captions(photos / "bad.txt")
    assert load_captions(None) == {}


def test_random_crops_flips_and_small_images(photos):
    files = list_sources([str(photos / "a"), str(photos / "b")])
    torch.manual_seed(0)
    ds = HQCropDataset(files, crop_size=32, hflip=True)
    crops = [ds[0]["hq"] for _ in range(12)]
    assert all(c.shape == (3, 32, 32) and 0 <= c.min() and c.max() <= 1 for c in crops)
    assert len({c.sum().item() for c in crops}) > 6  # positions vary
    small = HQCropDataset(files, crop_size=48)[2]["hq"]  # 40x30 coffee is upscaled to fit the crop
    assert small.shape == (3, 48, 48)
    # random=False: the centre crop, the same whatever the RNG state (astronaut.png is 96 x 80)
    import numpy as np
    from PIL import Image

    centre = HQCropDataset(files, crop_size=32, random=False)
    arr = np.asarray(Image.open(files[0]).convert("RGB"))[(80 - 32) // 2:(80 + 32) // 2, (96 - 32) // 2:(96 + 32) // 2]
    expected = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(centre[0]["hq"], expected)
    torch.rand(7)
    assert torch.equal(centre[0]["hq"], expected)
    # flips happen: with random=False nothing flips; with hflip the mirrored centre crop shows up
    full = HQCropDataset(files[:1], crop_size=80, hflip=True)  # crop = full height, 16 px of x freedom
    seen_flip = False
    ref = HQCropDataset(files[:1], crop_size=80, random=False)._load(files[0])
    for _ in range(20):
        x = full[0]["hq"]
        for left in range(0, 17):
            if torch.equal(x, ref[:, :, left:left + 80].flip(-1)):
                seen_flip = True
    assert seen_flip


@pytest.mark.parametrize("preset", ["bicubic", "pisa-sr"])
def test_lq_maker_resizes_back_and_quantises(preset):
    import skimage.data

    hq = torch.from_numpy(skimage.data.astronaut()[100:164, 200:264]).permute(2, 0, 1)[None].float() / 255
    hq = torch.cat([hq, hq.flip(-1)])
    maker = LQMaker(preset, scale=4, device="cpu")
    g = torch.Generator().manual_seed(0)
    lq = maker(hq, generator=g)
    assert lq.shape == hq.shape
    assert torch.equal(lq, (lq * 255).round() / 255)  # 8-bit levels
    assert 0 <= lq.min() and lq.max() <= 1
    # it is degraded (lost detail) but still the same picture
    err = (lq - hq).abs().mean().item()
    assert 0.005 < err < 0.3
    small = LQMaker(preset, scale=4, resize_back=False)(hq, generator=torch.Generator().manual_seed(0))
    assert small.shape == (2, 3, 16, 16)
    again = maker(hq, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, lq)  # seeded
