"""Training throughput and peak memory of the PiSA-SR / OSEDiff trainers on a full-size SD-2.1-base-shaped model
with random weights (no download), at several batch sizes, with gradient checkpointing.

    python benchmarks/bench_train.py                         # PiSA-SR, batch 1 and 4, fp16, 10 steps per stage
    python benchmarks/bench_train.py --method osediff --batch 1 2
    python benchmarks/bench_train.py --tiny --steps 2        # plumbing check on the CPU (tiny fixture model)

Prints one table row per (method, stage, batch): steps/s and peak CUDA memory. The LPIPS backbone uses random
stand-in weights (the timing is the same). Needs a CUDA GPU for meaningful numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("REALISR_GOLDEN_DIR", REPO / "tests" / "fixtures" / "golden"))  # the vendored set

# SD-2.1-base shapes (stabilityai/stable-diffusion-2-1-base configs)
SD21_UNET = dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, norm_num_groups=32, sample_size=64)
SD21_VAE = dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512)
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                 projection_dim=512)


def make_random_sd(folder: Path) -> Path:
    """A random-weight SD-2.1-base-shaped model folder (tokenizer/scheduler copied from the tiny fixture)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    src = GOLDEN / "sd"
    for sub in ("tokenizer", "scheduler"):
        shutil.copytree(src / sub, folder / sub, dirs_exist_ok=True)
    shutil.copy(src / "model_index.json", folder / "model_index.json")
    torch.manual_seed(0)
    ucfg = {k: v for k, v in UNet2DConditionModel.load_config(src, subfolder="unet").items() if not k.startswith("_")}
    UNet2DConditionModel.from_config({**ucfg, **SD21_UNET}).save_pretrained(folder / "unet")
    vcfg = {k: v for k, v in AutoencoderKL.load_config(src, subfolder="vae").items() if not k.startswith("_")}
    AutoencoderKL.from_config({**vcfg, **SD21_VAE}).save_pretrained(folder / "vae")
    tcfg = CLIPTextConfig.from_pretrained(src, subfolder="text_encoder").to_dict()
    tcfg.update(SD21_TEXT)
    CLIPTextModel(CLIPTextConfig(**tcfg)).save_pretrained(folder / "text_encoder")
    return folder


def make_data(folder: Path) -> Path:
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.png")
    return folder


def stand_in_vgg(path: Path) -> Path:
    import torch
    from torchvision.models.vgg import cfgs, make_layers

    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, path)
    return path


def run_one(method, stage, batch, steps, sd, hq, vgg, out, crop, mixed_precision):
    from realisr.cli.train import make_trainer
    from realisr.train.config import load_recipe

    over = [f"data.hq=[{{path: {hq}, repeat: 8}}]", f"model.pretrained={sd}", f"data.batch_size={batch}",
            "data.num_workers=2", f"data.crop_size={crop}", f"train.max_steps={steps}",
            "train.checkpoint_every=0", "validation.every=0", "train.log_every=1000000",
            f"train.mixed_precision={mixed_precision}", "model.gradient_checkpointing=true",
            f"loss.lpips_vgg_weights={vgg}", f"output_dir={out}"]
    if method == "pisa-sr":
        over.append(f"pisa_sr.pix_steps={steps + 10 if stage == 'pixel' else 0}")
    cfg = load_recipe(method, over)
    trainer = make_trainer(cfg)
    trainer.setup()
    trainer.cfg.train.max_steps = 1  # warm-up step (allocator, kernels), not timed
    trainer.train()
    trainer.cfg.train.max_steps = steps + 1
    summary = trainer.train()  # steps_per_s is measured inside the step loop (no checkpoint writing)
    return summary, summary["steps_per_s"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=("pisa-sr", "osediff"), default="pisa-sr")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--mixed-precision", default="fp16", choices=("no", "fp16", "bf16"))
    p.add_argument("--tiny", action="store_true", help="use the tiny fixture model (CPU plumbing check)")
    args = p.parse_args(argv)

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="realisr-bench-train-"))
    try:
        sd = GOLDEN / "sd" if args.tiny else make_random_sd(tmp / "sd")
        crop = 64 if args.tiny else args.crop
        hq = make_data(tmp / "hq")
        vgg = stand_in_vgg(tmp / "vgg16-397923af.pth")
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        stages = ("pixel", "semantic") if args.method == "pisa-sr" else ("vsd",)
        print(f"# {args.method} training, {device}, crop {crop}, {args.mixed_precision}, gradient checkpointing")
        print(f"{'stage':>9} {'batch':>5} {'steps/s':>8} {'img/s':>7} {'peak GiB':>9}")
        for stage in stages:
            for b in args.batch:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                summary, sps = run_one(args.method, stage, b, args.steps, sd, hq, vgg, tmp / "run", crop,
                                       args.mixed_precision)
                peak = summary["peak_memory_bytes"] / 2**30
                print(f"{stage:>9} {b:>5} {sps:>8.3f} {sps * b:>7.2f} {peak:>9.2f}")
                sys.stdout.flush()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
