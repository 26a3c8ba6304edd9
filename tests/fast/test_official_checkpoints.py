"""Official checkpoints: safe loading, the official LoRA rules (module lists, scale 2.0), clear errors for
malformed files, safetensors conversion, the registry hooks (weights_status, -m auto) and load_pipeline(.pkl)."""

from __future__ import annotations

import pickle

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from helpers import onestep  # noqa: E402

from realisr.errors import CheckpointError, WeightsNotFoundError  # noqa: E402

GOLDEN = onestep.golden_dir()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with onestep.one_thread():
        yield


@pytest.fixture(scope="module")
def pisa_raw():
    return torch.load(GOLDEN / "pisa_sr.pkl", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def ose_raw():
    return torch.load(GOLDEN / "osediff.pkl", map_location="cpu", weights_only=True)


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(onestep.sd_dir()), subfolder="unet")


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(onestep.sd_dir()), subfolder="vae")


def _save(tmp_path, d, name="bad.pkl"):
    p = tmp_path / name
    torch.save(d, p)
    return p


def test_official_module_selection_matches_the_checkpoints(pisa_raw, ose_raw):
    """Our implementation of the official selection rules gives the lists the official code stored."""
    from realisr.models import lora

    groups = lora.unet_lora_target_modules(_unet())
    assert [len(groups[g]) for g in lora.GROUPS] == [94, 148, 16]
    for g in lora.GROUPS:
        assert groups[g] == pisa_raw[f"unet_lora_{g}_modules_pix"] == pisa_raw[f"unet_lora_{g}_modules_sem"]
        assert groups[g] == ose_raw[f"unet_lora_{g}_modules"]
    vae_list = lora.vae_encoder_lora_target_modules(_vae())
    assert vae_list == ose_raw["vae_lora_encoder_modules"]
    assert len(vae_list) == 65 and len(set(vae_list)) == 32
    assert not any("time_emb_proj" in m or "norm" in m for g in groups.values() for m in g)


def test_lora_scale_is_alpha_8_over_rank(pisa_raw):
    """Loaded adapters apply delta W = (8 / r) * B @ A = 2 B A at r = 4 (alpha is not in the file)."""
    from realisr.models import lora

    unet = _unet()
    lora.inject_pisa_adapters(unet, branches=("pix",))
    sd = {k: v for k, v in pisa_raw["state_dict_unet"].items() if "_pix." in k}
    lora.load_lora_state_dict(unet, sd)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    layer = unet.get_submodule(name)
    a = pisa_raw["state_dict_unet"][f"{name}.lora_A.default_encoder_pix.weight"]
    b = pisa_raw["state_dict_unet"][f"{name}.lora_B.default_encoder_pix.weight"]
    x = torch.randn(2, 5, a.shape[1])
    expected = x @ (layer.base_layer.weight + 2.0 * b @ a).T
    with torch.no_grad():
        assert (layer(x) - expected).abs().max() <= 1e-5
    # conv: A carries the kernel, B is 1x1
    conv = unet.get_submodule("conv_in")
    ca = pisa_raw["state_dict_unet"]["conv_in.lora_A.default_encoder_pix.weight"]
    cb = pisa_raw["state_dict_unet"]["conv_in.lora_B.default_encoder_pix.weight"]
    z = torch.randn(1, 4, 6, 6)
    w = conv.base_layer.weight + 2.0 * torch.einsum("or,rikl->oikl", cb[:, :, 0, 0], ca)
    with torch.no_grad():
        ref = torch.nn.functional.conv2d(z, w, conv.base_layer.bias, padding=1)
        assert (conv(z) - ref).abs().max() <= 1e-5


def test_load_and_validate_both(tmp_path):
    from realisr.weights.official import load_official_checkpoint

    p = load_official_checkpoint(GOLDEN / "pisa_sr.pkl")
    o = load_official_checkpoint(GOLDEN / "osediff.pkl")
    assert (p.method, o.method) == ("pisa-sr", "osediff")
    assert len(p.branch_state_dict("pix")) == len(p.branch_state_dict("sem")) == 516
    assert p.rank("pix") == p.rank("sem") == o.rank("unet") == o.rank("vae") == 4
    with pytest.raises(CheckpointError, match="osediff"):
        load_official_checkpoint(GOLDEN / "osediff.pkl", expect="pisa-sr")
    with pytest.raises(WeightsNotFoundError):
        load_official_checkpoint(tmp_path / "nope.pkl")


def _mutations(pisa_raw, ose_raw):
    def drop_list(d):
        d = dict(d)
        del d["unet_lora_decoder_modules_sem"]
        return d

    def drop_tensor(d):
        d = dict(d)
        sd = dict(d["state_dict_unet"])
        del sd["mid_block.resnets.1.conv2.lora_B.default_others_sem.weight"]
        d["state_dict_unet"] = sd
        return d

    def wrong_rank(d):
        d = dict(d)
        d["lora_rank_unet_pix"] = 8
        return d

    def bad_rank_type(d):
        d = dict(d)
        d["lora_rank_unet_sem"] = "4"
        return d

    def rank_mismatch_tensor(d):
        d = dict(d)
        sd = dict(d["state_dict_unet"])
        k = "conv_in.lora_A.default_encoder_pix.weight"
        sd[k] = torch.zeros(3, *sd[k].shape[1:])
        d["state_dict_unet"] = sd
        return d

    def foreign_key(d):
        d = dict(d)
        sd = dict(d["state_dict_unet"])
        sd["conv_in.lora_A.default_encoder_xyz.weight"] = sd["conv_in.lora_A.default_encoder_pix.weight"]
        d["state_dict_unet"] = sd
        return d

    def nan_tensor(d):
        d = dict(d)
        sd = dict(d["state_dict_unet"])
        k = "conv_in.lora_B.default_encoder_sem.weight"
        sd[k] = torch.full_like(sd[k], float("nan"))
        d["state_dict_unet"] = sd
        return d

    def ose_no_conv_in(d):
        d = dict(d)
        sd = dict(d["state_dict_unet"])
        del sd["conv_in.base_layer.weight"]
        d["state_dict_unet"] = sd
        return d

    def ose_no_vae(d):
        d = dict(d)
        del d["state_dict_vae"]
        return d

    return [("missing list", pisa_raw, drop_list, "unet_lora_decoder_modules_sem"),
            ("missing tensor", pisa_raw, drop_tensor, "missing"),
            ("wrong rank", pisa_raw, wrong_rank, "rank 8"),
            ("rank type", pisa_raw, bad_rank_type, "positive integer"),
            ("tensor rank", pisa_raw, rank_mismatch_tensor, "rank 4"),
            ("foreign adapter", pisa_raw, foreign_key, "default_encoder_xyz"),
            ("nan", pisa_raw, nan_tensor, "NaN"),
            ("osediff conv_in", ose_raw, ose_no_conv_in, "conv_in"),
            ("osediff vae", ose_raw, ose_no_vae, "state_dict_vae")]


def test_malformed_checkpoints_are_rejected_clearly(tmp_path, pisa_raw, ose_raw):
    from realisr.weights.official import load_official_checkpoint

    for label, raw, mutate, needle in _mutations(pisa_raw, ose_raw):
        p = _save(tmp_path, mutate(raw), f"{label.replace(' ', '_')}.pkl")
        with pytest.raises(CheckpointError, match=needle) as info:
            load_official_checkpoint(p)
        assert "\n" not in str(info.value), label
    # not a dict, not an official dict, not a pickle, and a pickle that would run code
    for name, payload in (("list.pkl", [1, 2]), ("other.pkl", {"params": torch.zeros(2)})):
        with pytest.raises(CheckpointError):
            load_official_checkpoint(_save(tmp_path, payload, name))
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_official_checkpoint(junk)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"state_dict_unet": _Evil()}))
    with pytest.raises(CheckpointError, match="weights_only"):
        load_official_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_shapes_that_do_not_fit_the_backbone(tmp_path, pisa_raw):
    """A checkpoint for a wider UNet passes the structural checks but is refused when loaded on this backbone."""
    from realisr.pipelines.pisa_sr.pipeline_pisa_sr import PiSASRPipeline
    from realisr.registry import get_spec
    from realisr.weights.official import load_official_checkpoint

    d = dict(pisa_raw)
    sd = dict(d["state_dict_unet"])
    for k in ("conv_in.lora_B.default_encoder_pix.weight", "conv_in.lora_B.default_encoder_sem.weight"):
        sd[k] = torch.zeros(sd[k].shape[0] * 2, *sd[k].shape[1:])
    d["state_dict_unet"] = sd
    ckpt = load_official_checkpoint(_save(tmp_path, d, "wide.pkl"))

    def build(c):  # only the UNet matters here; the checkpoint is refused before the rest is touched
        return PiSASRPipeline.from_components(get_spec("pisa-sr"), unet=_unet(), vae=None, text_encoder=None,
                                              tokenizer=None, checkpoint=c)
    with pytest.raises(CheckpointError, match="does not fit"):
        build(ckpt)
    d2 = dict(pisa_raw)
    d2["unet_lora_others_modules_pix"] = list(d2["unet_lora_others_modules_pix"]) + ["mid_block.nothing_here"]
    sd2 = dict(d2["state_dict_unet"])
    sd2["mid_block.nothing_here.lora_A.default_others_pix.weight"] = torch.zeros(4, 8)
    sd2["mid_block.nothing_here.lora_B.default_others_pix.weight"] = torch.zeros(8, 4)
    d2["state_dict_unet"] = sd2
    ckpt2 = load_official_checkpoint(_save(tmp_path, d2, "extra_module.pkl"))
    with pytest.raises(CheckpointError, match="not found"):
        build(ckpt2)


def test_convert_roundtrip_and_cli(tmp_path):
    from realisr.cli.main import main
    from realisr.weights.official import convert_checkpoint, load_official_checkpoint

    for name in ("pisa_sr", "osediff"):
        src = GOLDEN / f"{name}.pkl"
        out = tmp_path / f"{name}.safetensors"
        assert main(["convert", str(src), str(out)]) == 0
        assert main(["convert", str(src), str(out)]) == 1  # refuses to overwrite
        a, b = load_official_checkpoint(src), load_official_checkpoint(out)
        assert a.method == b.method
        assert {k: v for k, v in a.raw.items() if not k.startswith("state")} == \
            {k: v for k, v in b.raw.items() if not k.startswith("state")}
        for part in ("state_dict_unet", "state_dict_vae"):
            assert set(a.raw.get(part, {})) == set(b.raw.get(part, {}))
            for k, v in a.raw.get(part, {}).items():
                assert torch.equal(v, b.raw[part][k])
        back = tmp_path / f"{name}_back.pkl"
        convert_checkpoint(out, back)
        assert load_official_checkpoint(back).method == a.method
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(CheckpointError, match="realisr convert"):
        load_official_checkpoint(plain)


def test_weights_status_auto_and_load_pipeline(tmp_path, monkeypatch):
    import shutil

    from realisr.api import load_pipeline, resolve_model_id
    from realisr.registry import get_spec
    from realisr.weights.status import weights_status

    spec = get_spec("pisa-sr")
    monkeypatch.setenv("REALISR_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("REALISR_SD", raising=False)
    ok, why = weights_status(spec)
    assert not ok and "pisa_sr.pkl" in why and "REALISR_WEIGHTS" in why
    assert resolve_model_id("auto") != "pisa-sr"
    (tmp_path / "w").mkdir()
    shutil.copy(GOLDEN / "pisa_sr.pkl", tmp_path / "w" / "pisa_sr.pkl")
    ok, why = weights_status(spec)
    assert not ok and "stable-diffusion-2-1-base" in why
    monkeypatch.setenv("REALISR_SD", str(onestep.sd_dir()))
    ok, why = weights_status(spec)
    assert ok, why
    assert resolve_model_id("auto") == "pisa-sr"
    assert not weights_status(get_spec("osediff"))[0]
    # an official .pkl path loads the right pipeline
    pipe = load_pipeline(str(GOLDEN / "osediff.pkl"), device="cpu", sd=str(onestep.sd_dir()))
    assert type(pipe).__name__ == "OSEDiffPipeline" and pipe.scale == 4
    # and so does its converted safetensors
    from realisr.weights.official import convert_checkpoint

    _, st = convert_checkpoint(GOLDEN / "pisa_sr.pkl", tmp_path / "pisa_sr.safetensors")
    pipe = load_pipeline(str(st), device="cpu", sd=str(onestep.sd_dir()))
    assert type(pipe).__name__ == "PiSASRPipeline"


def test_backbone_errors_name_missing_parts(tmp_path, monkeypatch):
    from realisr.models.backbone import load_backbone, missing_components

    half = tmp_path / "sd"
    for part in ("unet", "vae"):
        shutil_copy(onestep.sd_dir() / part, half / part)
    assert missing_components(half) == ["text_encoder/", "tokenizer/", "scheduler/"]
    with pytest.raises(WeightsNotFoundError, match="text_encoder/, tokenizer/, scheduler/"):
        load_backbone(str(half))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("REALISR_SD", raising=False)
    with pytest.raises(WeightsNotFoundError, match="--sd"):
        load_backbone(None, components=("unet",))
    monkeypatch.setenv("REALISR_SD", str(tmp_path / "missing"))
    with pytest.raises(WeightsNotFoundError, match="REALISR_SD"):
        load_backbone(None)
    bb = load_backbone(str(half), components=("unet", "vae"))
    assert bb.unet is not None and bb.text_encoder is None


def shutil_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
