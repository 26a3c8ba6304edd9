"""Training recipes: built-in YAMLs carry the official settings; --set overrides are type checked."""

import pytest

from realisr.train.config import RecipeError, builtin_recipes, load_recipe


def test_builtin_recipes_have_official_settings():
    assert {"pisa-sr", "osediff", "tiny-cpu"} <= set(builtin_recipes())
    pisa = load_recipe("pisa-sr")
    assert pisa.method == "pisa-sr"
    assert (pisa.pisa_sr.pix_steps, pisa.train.max_steps) == (4000, 12500)  # 4k pixel + 8.5k semantic
    assert pisa.train.lr == 5e-5 and pisa.train.weight_decay == 1e-2 and pisa.train.max_grad_norm == 1.0
    assert (pisa.loss.l2, pisa.loss.lpips, pisa.loss.csd) == (1.0, 2.0, 1.0)
    assert pisa.pisa_sr.cfg_scale == 7.5 and pisa.pisa_sr.timestep_range == [20, 500]
    assert pisa.data.null_text_ratio == 0.5 and pisa.data.crop_size == 512 and pisa.data.scale == 4
    assert "over-smooth" in pisa.pisa_sr.negative_prompt
    ose = load_recipe("osediff")
    assert ose.method == "osediff" and 13000 <= ose.train.max_steps <= 15000
    assert (ose.loss.l2, ose.loss.lpips, ose.loss.vsd, ose.loss.vsd_lora) == (1.0, 2.0, 1.0, 1.0)
    assert ose.osediff.fake_unet_adapters == "all" and ose.osediff.timestep_range == [20, 980]
    assert ose.data.degradation == "osediff"


def test_overrides_are_parsed_and_type_checked():
    cfg = load_recipe("pisa-sr", ["train.max_steps=10", "train.lr=1e-4", "data.hq=[a/, b.txt]",
                                  "loss.lpips=0", "train.resume=latest", "validation.images=null"])
    assert cfg.train.max_steps == 10 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.hq == ["a/", "b.txt"]
    assert cfg.loss.lpips == 0.0 and isinstance(cfg.loss.lpips, float)  # int accepted for a float key
    assert cfg.train.resume == "latest" and cfg.validation.images is None
    with pytest.raises(RecipeError, match="train.max_steps must be int"):
        load_recipe("pisa-sr", ["train.max_steps=ten"])
    with pytest.raises(RecipeError, match="model.gradient_checkpointing must be bool"):
        load_recipe("pisa-sr", ["model.gradient_checkpointing=3"])
    with pytest.raises(RecipeError, match="unknown key 'train.max_step'"):
        load_recipe("pisa-sr", ["train.max_step=10"])
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe("pisa-sr", ["train.max_steps"])
    with pytest.raises(RecipeError, match="mixed_precision"):
        load_recipe("pisa-sr", ["train.mixed_precision=fp8"])
    with pytest.raises(RecipeError, match="fake_unet_adapters"):
        load_recipe("osediff", ["osediff.fake_unet_adapters=some"])


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("method: pisa-sr\ntrian:\n  max_steps: 3\n")
    with pytest.raises(RecipeError, match="unknown key 'trian'"):
        load_recipe(typo)
    ok = tmp_path / "ok.yaml"
    ok.write_text("method: osediff\ntrain:\n  max_steps: 3\n")
    cfg = load_recipe(ok, ["train.max_steps=4"])
    assert cfg.method == "osediff" and cfg.train.max_steps == 4 and cfg.train.lr == 5e-5


def test_cli_print_recipe(capsys):
    import json

    from realisr.cli.main import main

    assert main(["train", "osediff", "--set", "train.max_steps=7", "--no-lpips", "--print-recipe"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train"]["max_steps"] == 7 and out["loss"]["lpips"] == 0.0
    assert main(["train", "osediff", "--set", "train.max_steps=x"]) == 1  # one-line error, no traceback


def test_string_keys_keep_the_raw_text():
    cfg = load_recipe("pisa-sr", ["output_dir=2024-01-01", "model.pretrained=123", "data.captions=yes"])
    assert cfg.output_dir == "2024-01-01" and cfg.model.pretrained == "123" and cfg.data.captions == "yes"
    with pytest.raises(RecipeError, match="must be bool"):
        load_recipe("pisa-sr", ["data.hflip=maybe"])


def test_tiny_cpu_finds_the_tiny_model_of_the_clone_from_any_folder(tmp_path, monkeypatch):
    """The tiny-cpu recipe names the vendored tests/fixtures/golden/sd: found from another working folder when
    realisr runs from its clone; a folder that exists nowhere is a one-line error naming --set model.pretrained."""
    from pathlib import Path

    from realisr.errors import WeightsNotFoundError
    from realisr.train.trainer_base import resolve_pretrained

    repo = Path(__file__).resolve().parents[2]
    cfg = load_recipe("tiny-cpu")
    assert cfg.model.pretrained == "tests/fixtures/golden/sd"
    monkeypatch.chdir(tmp_path)
    assert resolve_pretrained(cfg.model.pretrained) == repo / "tests" / "fixtures" / "golden" / "sd"
    (tmp_path / "mine").mkdir()
    assert resolve_pretrained("mine") == Path("mine")  # the working folder comes first
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError, match="--set model.pretrained=FOLDER") as e:
        resolve_pretrained("tests/fixtures/no-such-model")
    assert "\n" not in str(e.value)
