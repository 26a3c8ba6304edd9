"""The tagger's behaviour around the maths: finding files (one-line errors naming each missing file), threshold
overrides, the LoRA maths against hand computations, the official preprocessing against torchvision, the DAPE
layout round trip and ``realisr tag``. Parity with the official code is in ``test_tagging_parity.py``."""

from __future__ import annotations

import json
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers.fixtures import fixture_set  # noqa: E402

from realisr.cli.main import main  # noqa: E402
from realisr.errors import CheckpointError, WeightsNotFoundError  # noqa: E402

ROOT = fixture_set("golden-seesr")
RAM_DIR = ROOT / "ram"


@pytest.fixture()
def weights(tmp_path, monkeypatch):
    """An empty $REALISR_WEIGHTS."""
    w = tmp_path / "weights"
    w.mkdir()
    monkeypatch.setenv("REALISR_WEIGHTS", str(w))
    return w


@pytest.fixture(scope="module")
def ram_info():
    return json.loads((ROOT / "ram_outputs" / "ram_info.json").read_text(encoding="utf-8"))


def _lr(name="in0"):
    from PIL import Image

    return Image.open(ROOT / "inputs" / name / "lq.png")


def test_missing_files_are_each_named_in_one_line(weights):
    from realisr.tagging import load_tagger

    with pytest.raises(WeightsNotFoundError) as e:
        load_tagger("dape")
    msg = str(e.value)
    assert "\n" not in msg
    for name in ("ram_swin_large_14m.pth", "DAPE.pth", "ram_tag_list.txt", "ram_tag_list_threshold.txt"):
        assert name in msg
    assert "ram_tag_list_chinese.txt" not in msg
    with pytest.raises(WeightsNotFoundError) as e:
        load_tagger("ram", chinese=True)
    assert "DAPE.pth" not in str(e.value) and "ram_tag_list_chinese.txt" in str(e.value)
    # an explicit path that does not exist is named as given; the files found elsewhere are not
    (weights / "ram").symlink_to(RAM_DIR)
    with pytest.raises(WeightsNotFoundError) as e:
        load_tagger("dape", dape=weights / "nope" / "my_dape.pth")
    assert "my_dape.pth" in str(e.value) and "ram_tag_list.txt" not in str(e.value)


def test_files_are_found_in_the_checkpoints_folder(weights):
    """The layout of SeeSR's ram/ folder under $REALISR_WEIGHTS/ram: weights, data/*.txt, configs/*.json."""
    from realisr.tagging import find_tagger_files, load_tagger

    (weights / "ram").symlink_to(RAM_DIR)
    files = find_tagger_files("dape")
    assert files.ram == weights / "ram" / "ram_swin_large_14m.pth"
    assert files.tag_list == weights / "ram" / "data" / "ram_tag_list.txt"
    assert files.q2l_config == weights / "ram" / "configs" / "q2l_config.json"  # the tiny configs, not ours
    tagger = load_tagger("dape", device="cpu")
    assert tagger.num_classes == 20 and tagger.kind == "dape"


def test_packaged_configs_are_the_official_swin_l():
    """Without a configs/ folder the official RAM Swin-L / Query2Label configs shipped with realisr are used."""
    from realisr.tagging.loading import _PACKAGED

    swin = json.loads((_PACKAGED / "swin" / "config_swinL_384.json").read_text())
    q2l = json.loads((_PACKAGED / "q2l_config.json").read_text())
    assert (swin["embed_dim"], swin["depths"], swin["num_heads"], swin["window_size"], swin["image_res"]) == \
        (192, [2, 2, 18, 2], [6, 12, 24, 48], 12, 384)
    assert swin["vision_width"] == 192 * 8
    assert (q2l["hidden_size"], q2l["num_hidden_layers"], q2l["num_attention_heads"],
            q2l["intermediate_size"]) == (768, 2, 4, 3072)


def test_threshold_overrides(ram_info):
    from realisr.tagging import load_tagger

    probs = np.load(ROOT / "ram_outputs" / "in1" / "dape_probs.npy")[0]
    t = float(np.sort(probs)[len(probs) // 2])  # half of the classes above
    # a single value replaces the per-class thresholds (the threshold file is then not needed)
    tagger = load_tagger("dape", root=RAM_DIR, device="cpu", threshold=t,
                         thresholds=RAM_DIR / "data" / "missing.txt")
    res = tagger(_lr("in1"))
    assert res.indices[0] == [i for i, p in enumerate(probs) if p > t]
    # per call, and as a mapping that changes one tag of the file's thresholds
    tagger = load_tagger("dape", root=RAM_DIR, device="cpu")
    assert tagger(_lr("in1"), threshold=0.0).indices[0] == list(range(len(probs)))
    official = ram_info["inputs"]["in1"]["dape_tags"].split(", ")
    res = tagger(_lr("in1"), threshold={official[0]: 0.999})
    assert res.tags[0] == official[1:]
    with pytest.raises(ValueError, match="unknown tag"):
        tagger(_lr("in1"), threshold={"no such tag": 0.5})
    with pytest.raises(ValueError, match="3 thresholds for 20 tags"):
        tagger.set_thresholds([0.5, 0.5, 0.5])


def test_result_shapes_and_single_image_convenience():
    from realisr.tagging import load_tagger

    tagger = load_tagger("dape", root=RAM_DIR, device="cpu")
    x = torch.from_numpy(np.load(ROOT / "inputs" / "in0" / "lq.npy"))  # [1,3,H,W] float in [0,1]
    res = tagger(torch.cat([x, x]))
    assert res.image_embeds.shape == (2, 145, 512) and res.visual.shape == (2, 145, 64)
    assert res.logits.shape == res.probs.shape == (2, 20)
    assert res.text[0] == res.text[1] == tagger.prompt(x)
    with pytest.raises(ValueError, match="one image"):
        res.tag_string  # noqa: B018


def test_bad_files_give_one_line_errors(tmp_path):
    from realisr.tagging import load_tagger

    short = tmp_path / "tags.txt"
    short.write_text("\n".join(["a"] * 19) + "\n")
    with pytest.raises(CheckpointError, match="label_embed") as e:
        load_tagger("ram", root=RAM_DIR, tag_list=short, threshold=0.5, device="cpu")
    assert "\n" not in str(e.value)
    bad = tmp_path / "ram_swin_large_14m.pth"
    torch.save({"model": {"foo": torch.zeros(1)}}, bad)
    with pytest.raises(CheckpointError, match="not a RAM checkpoint"):
        load_tagger("ram", root=RAM_DIR, ram=bad, device="cpu")
    evil = tmp_path / "DAPE.pth"
    torch.save({"x.lora_A": torch.zeros(1), "obj": functools.partial(print, "hi")}, evil)  # code: refused
    with pytest.raises(CheckpointError, match="weights_only"):
        load_tagger("dape", root=RAM_DIR, dape=evil, device="cpu")


def test_lora_linear_matches_loralib_maths():
    """MergedLinear(enable_lora=[True, False, True]): q rows += B[:d] @ A[:r], k rows untouched,
    v rows += B[d:] @ A[r:], all times alpha / r; lora.Linear: += B @ A * alpha / r."""
    from realisr.tagging.ram_arch import LoRALinear

    g = torch.Generator().manual_seed(0)
    d, r = 6, 2
    lin = LoRALinear(d, 3 * d, lora_rank=r, lora_alpha=1.0, lora_groups=(True, False, True))
    assert lin.lora_A.shape == (2 * r, d) and lin.lora_B.shape == (2 * d, r)
    with torch.no_grad():
        lin.lora_B.copy_(torch.randn(2 * d, r, generator=g))
    a, b = lin.lora_A.detach().clone(), lin.lora_B.detach().clone()
    w0 = lin.weight.detach().clone()
    expect = w0.clone()
    expect[:d] += b[:d] @ a[:r] / r
    expect[2 * d:] += b[d:] @ a[r:] / r
    x = torch.randn(5, d, generator=g)
    ref = x @ expect.T + lin.bias.detach()
    assert torch.allclose(lin(x), ref, atol=1e-5)
    lin.merge_lora()
    assert not lin.has_lora and torch.allclose(lin.weight, expect, atol=1e-6)
    assert torch.allclose(lin(x), ref, atol=1e-5)
    full = LoRALinear(d, 4, lora_rank=r, lora_alpha=1.0)
    with torch.no_grad():
        full.lora_B.copy_(torch.randn(4, r, generator=g))
    expect = full.weight.detach() + full.lora_B.detach() @ full.lora_A.detach() / r
    assert torch.allclose(full(x), x @ expect.T + full.bias.detach(), atol=1e-5)


def test_preprocessing_is_torchvision_resize_without_antialias_and_imagenet_norm():
    """The official ram_transforms on a tensor (torchvision 0.15: no antialias), also when downscaling."""
    tv = pytest.importorskip("torchvision.transforms")
    from realisr.tagging import ram_preprocess

    x = torch.rand(2, 3, 500, 700, generator=torch.Generator().manual_seed(1))
    ref = tv.Compose([tv.Resize((384, 384), antialias=False),
                      tv.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])(x)
    assert torch.allclose(ram_preprocess(x), ref, atol=1e-6)


def test_dape_layout_round_trip(tmp_path):
    """LoRA tensors saved with dape_state_dict have the official DAPE.pth keys and load back into the tagger
    (plain RAM + these LoRA updates, as training produces them) with the same outputs."""
    from realisr.tagging import load_tagger
    from realisr.tagging.loading import dape_state_dict, find_tagger_files, load_ram_model

    official = torch.load(RAM_DIR / "DAPE.pth", weights_only=True)
    model, _ = load_ram_model(find_tagger_files("ram", root=RAM_DIR), lora_rank=8)  # fresh LoRA on plain RAM
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.lora_layers():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
    sd = dape_state_dict(model)
    assert set(sd) == {k for k in official if not k.startswith(("tag_encoder.", "text_decoder."))}
    assert all(sd[k].shape == official[k].shape for k in sd)
    out = tmp_path / "DAPE.pth"
    torch.save(sd, out)
    tagger = load_tagger("dape", root=RAM_DIR, dape=out, device="cpu")
    x = tagger.preprocess(_lr("in2"))
    with torch.no_grad():
        ref = model.eval()(x)
    res = tagger(_lr("in2"))
    assert (res.image_embeds - ref["image_embeds"]).abs().max() <= 1e-5
    assert (res.logits - ref["logits"]).abs().max() <= 1e-5


def test_cli_tag_file_folder_and_json(capsys, ram_info):
    src = ROOT / "inputs"
    assert main(["tag", "-q", "-i", str(src / "in0" / "lq.png"), "--ram-dir", str(RAM_DIR), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == ram_info["inputs"]["in0"]["dape_tags"]
    assert main(["tag", "-q", "-i", str(src), "--recursive", "--ram-dir", str(RAM_DIR), "-m", "ram",
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(ram_info["inputs"])
    for line, name in zip(lines, sorted(ram_info["inputs"])):
        path, text = line.split("\t")
        assert path.endswith(f"{name}/lq.png") and text == ram_info["inputs"][name]["plain_tags"]
    assert main(["tag", "-q", "-i", str(src / "in0" / "lq.png"), str(src / "in1" / "lq.png"), "--json",
                 "--ram-dir", str(RAM_DIR), "--device", "cpu"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in recs] == [ram_info["inputs"][n]["dape_tags"] for n in ("in0", "in1")]
    probs = np.load(ROOT / "ram_outputs" / "in0" / "dape_probs.npy")[0]
    names = (RAM_DIR / "data" / "ram_tag_list.txt").read_text(encoding="utf-8").splitlines()
    assert set(recs[0]["scores"]) == set(recs[0]["tags"])
    for tag, p in recs[0]["scores"].items():
        assert abs(p - probs[names.index(tag)]) <= 1e-5


def test_cli_tag_reports_missing_files(weights, capsys):
    assert main(["tag", "-q", "-i", str(ROOT / "inputs" / "in0" / "lq.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DAPE.pth" in err and "ram_swin_large_14m.pth" in err
