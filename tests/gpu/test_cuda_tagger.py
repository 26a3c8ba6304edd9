"""CUDA checks of the RAM / DAPE tagger on the golden-seesr fixtures: fp32 on CUDA equals the official CPU
record, and fp16 (the official scripts' precision, ``dtype="auto"`` on CUDA) stays close to it."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers.fixtures import fixture_set  # noqa: E402

pytestmark = pytest.mark.gpu
ROOT = fixture_set("golden-seesr")


@pytest.mark.parametrize("dtype,tol_embeds,tol_probs", [("fp32", 1e-4, 1e-5), ("fp16", 2e-2, 2e-3)])
def test_dape_on_cuda(dtype, tol_embeds, tol_probs):
    from PIL import Image

    from realisr.tagging import load_tagger

    info = json.loads((ROOT / "ram_outputs" / "ram_info.json").read_text())["inputs"]
    tagger = load_tagger("dape", root=ROOT / "ram", device="cuda", dtype=dtype)
    assert tagger.dtype == (torch.float32 if dtype == "fp32" else torch.float16)
    for name in sorted(info):
        res = tagger(Image.open(ROOT / "inputs" / name / "lq.png"))
        assert res.image_embeds.device.type == "cuda"
        emb = res.image_embeds.float().cpu().numpy()
        assert np.abs(emb - np.load(ROOT / "ram_outputs" / name / "dape_image_embeds.npy")).max() <= tol_embeds
        probs = res.probs.cpu().numpy()
        assert np.abs(probs - np.load(ROOT / "ram_outputs" / name / "dape_probs.npy")).max() <= tol_probs
        if dtype == "fp32":
            assert res.tag_string == info[name]["dape_tags"]
