"""What the PiSA-SR and OSEDiff trainers share: accelerate setup, backbone loading, prompts, data, the step
loop, checkpoints (official .pkl + safetensors + resume state), validation images and logs.

A trainer subclass builds its networks and optimisers (:meth:`BaseTrainer.build`), runs one optimisation step
(:meth:`BaseTrainer.training_step`) and says what goes into a checkpoint. Randomness of a step (degradation,
noise, timesteps, prompt drop) comes from generators seeded by ``(seed, step, rank)``, the data order from
``(seed, epoch)`` (accelerate's seedable sampler) and each crop and flip from ``(seed, epoch, item)``; the
position inside the epoch is recorded, and accelerate's ``save_state`` / ``load_state`` keep the rest
(optimiser moments, the fp16 gradient scaler, every process's global RNG states). A resumed run therefore
continues exactly as an uninterrupted one would have.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from realisr.errors import RealisrError, WeightsNotFoundError
from realisr.progress import report
from realisr.train.config import RecipeConfig, recipe_to_dict

__all__ = ["BaseTrainer", "TrainingError", "resolve_pretrained", "load_sd_components", "find_checkpoint"]

logger = logging.getLogger(__name__)


class TrainingError(RealisrError, RuntimeError):
    """Training cannot start or continue (bad resume folder, too little data for the batch, ...)."""


def _keep_model_weights_out(models, weights, output_dir) -> None:
    """accelerate ``save_state`` hook: write no model state dicts (the trainer saves its trainable tensors)."""
    weights.clear()


def _load_no_model_weights(models, input_dir) -> None:
    """accelerate ``load_state`` hook: load no model state dicts (the trainer restores its trainable tensors)."""
    models.clear()


def _source_checkout() -> Optional[Path]:
    """The root of the realisr clone this code runs from (an editable install), else ``None``."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "realisr").is_dir() else None


def resolve_pretrained(pretrained: str) -> Path:
    """A diffusers model folder: a local path, a path relative to the realisr clone this code runs from (the
    ``tiny-cpu`` recipe names ``tests/fixtures/golden/sd``), or a hub id already in the HF cache (no download).

    Raises:
        WeightsNotFoundError: none of them exists.
    """
    p = Path(pretrained).expanduser()
    if p.is_dir():
        return p
    checkout = _source_checkout()
    if not p.is_absolute() and checkout is not None and (checkout / p).is_dir():
        logger.info("model.pretrained %s: the folder of the realisr clone %s", pretrained, checkout)
        return checkout / p
    from realisr.weights.cache import find_hf_snapshot, hf_hub_cache

    snap = find_hf_snapshot(pretrained)
    if snap is not None:
        return snap
    where = " (here or in a realisr clone)" if not p.is_absolute() else ""
    raise WeightsNotFoundError(f"diffusion backbone {pretrained!r} is neither a folder{where} nor in the HF cache "
                               f"({hf_hub_cache()}): download it there or set a local folder with "
                               "--set model.pretrained=FOLDER")


def load_sd_components(pretrained: str) -> dict:
    """Tokenizer, text encoder, VAE, UNet and DDPM scheduler of an SD-2.x folder (all on CPU, fp32)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = resolve_pretrained(pretrained)

    def st(sub: str) -> dict:  # safetensors where the folder has them; never the network
        return {"local_files_only": True,
                **({"use_safetensors": True} if any(Path(root, sub).glob("*.safetensors")) else {})}

    return {
        "tokenizer": CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True),
        "text_encoder": CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **st("text_encoder")),
        "vae": AutoencoderKL.from_pretrained(root, subfolder="vae", **st("vae")),
        "unet": UNet2DConditionModel.from_pretrained(root, subfolder="unet", **st("unet")),
        "scheduler": DDPMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True),
    }


def find_checkpoint(output_dir: Path, which: str) -> Path:
    """``latest`` -> the newest ``checkpoints/step-*`` folder with a resume state; or a given folder.

    Raises:
        TrainingError: nothing to resume from.
    """
    if which != "latest":
        p = Path(which).expanduser()
        if not (p / "training_state" / "state.json").is_file():
            raise TrainingError(f"{p} is not a training checkpoint folder (no training_state/state.json): "
                                "give a checkpoints/step-N folder or 'latest'")
        return p
    found = sorted((output_dir / "checkpoints").glob("step-*/training_state/state.json"))
    if not found:
        raise TrainingError(f"train.resume=latest but {output_dir / 'checkpoints'} holds no checkpoint")
    return found[-1].parent.parent


def _dtype_of(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


class BaseTrainer:
    """Shared training loop. Subclasses implement :meth:`build`, :meth:`training_step`,
    :meth:`official_checkpoint` and :meth:`generate`.

    Args:
        cfg: the recipe.
        callback: optional :mod:`realisr.progress` callback (stage ``"train"``).
    """

    method = ""
    #: file stem of the official checkpoint (``pisa_sr`` / ``osediff``).
    checkpoint_name = ""
    #: bound of the CPU cache of prompt embeddings (about 200 SD-2.1 embeddings)
    PROMPT_CACHE_BYTES = 64 * 2**20

    def __init__(self, cfg: RecipeConfig, callback: Optional[Callable] = None):
        self.cfg = cfg
        self.callback = callback
        self.output_dir = Path(cfg.output_dir).expanduser()
        self.step = 0
        self.lpips = None
        self.optimizers: dict[str, Any] = {}
        self.trainable: dict[str, torch.nn.Module] = {}  # prefix -> unwrapped module whose trainable params we save
        self._emb_cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.epoch = 0  # data position: the epoch, and the micro-batches of it already used
        self.batch_in_epoch = 0

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Check weights, build the accelerator, the networks, data and optimisers; resume if asked."""
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed

        cfg = self.cfg
        # LPIPS first: a missing file must stop us before anything slow (and before the stage that needs it).
        if self.needs_lpips():
            from realisr.errors import require
            from realisr.train.losses import find_lpips_vgg_weights

            find_lpips_vgg_weights(cfg.loss.lpips_vgg_weights)
            require("lpips", "train")
        resolve_pretrained(cfg.model.pretrained)
        init_ckpt = self.check_init_checkpoint(cfg.model.init_checkpoint) if cfg.model.init_checkpoint else None

        cpu = not torch.cuda.is_available()
        mp = cfg.train.mixed_precision
        if cpu and mp == "fp16":
            logger.warning("fp16 mixed precision needs a GPU: training in fp32 on the CPU")
            mp = "no"
        self.accelerator = Accelerator(
            mixed_precision=mp, gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)], cpu=cpu,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed))
        # save_state/load_state handle optimisers, scaler and RNGs; the trainable tensors are our own
        # trainable.safetensors (the frozen SD backbone is not copied into every checkpoint)
        self.accelerator.register_save_state_pre_hook(_keep_model_weights_out)
        self.accelerator.register_load_state_pre_hook(_load_no_model_weights)
        self.device = self.accelerator.device
        self.weight_dtype = _dtype_of(mp)
        set_seed(cfg.seed)  # identical initialisation on every rank (DDP also broadcasts rank 0's weights)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "recipe.json", "w", encoding="utf-8") as f:
                json.dump(recipe_to_dict(cfg), f, indent=1)

        if self.needs_lpips():
            from realisr.train.losses import load_lpips

            self.lpips = load_lpips(cfg.loss.lpips_vgg_weights).to(self.device)
        elif cfg.loss.lpips == 0:
            logger.warning("training WITHOUT the LPIPS loss (loss.lpips = 0), as requested")

        comps = load_sd_components(cfg.model.pretrained)
        self.tokenizer = comps["tokenizer"]
        self.text_encoder = comps["text_encoder"].requires_grad_(False).eval().to(self.device, self.weight_dtype)
        self.noise_scheduler = comps["scheduler"]
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.vae_scale = float(comps["vae"].config.scaling_factor)
        self.build(comps["unet"], comps["vae"])
        if init_ckpt is not None:
            self.load_init_checkpoint(init_ckpt)
        # from here on each rank draws its own augmentations (crops, flips, data-worker seeds)
        set_seed(cfg.seed, device_specific=True)
        self._build_data()
        self.after_prepare()
        if cfg.train.resume:
            self.load_state(find_checkpoint(self.output_dir, cfg.train.resume))

    def needs_lpips(self) -> bool:
        return self.cfg.loss.lpips > 0

    def cast_frozen(self, module: torch.nn.Module, keep_fp32: Iterable[torch.nn.Parameter]) -> None:
        """Frozen weights in the mixed-precision dtype, trainable ones (``keep_fp32``) in fp32."""
        keep = {id(p) for p in keep_fp32}
        module.to(self.device)
        for p in module.parameters():
            p.data = p.data.to(torch.float32 if id(p) in keep else self.weight_dtype)

    def _build_data(self) -> None:
        from realisr.train.data import HQCropDataset, LQMaker, list_sources, load_captions

        cfg = self.cfg
        files = list_sources(cfg.data.hq)
        captions = load_captions(cfg.data.captions)
        self.dataset = HQCropDataset(files, cfg.data.crop_size, cfg.data.hflip, captions, seed=cfg.seed)
        self.dataloader = self.make_dataloader(self.dataset, "add images, raise their repeat factor")
        self.lq_maker = LQMaker(cfg.data.degradation, cfg.data.scale, self.device)
        # validation: fixed crops and a fixed degradation, made once
        self._val = None
        if cfg.validation.every > 0 and cfg.validation.num > 0 and self.accelerator.is_main_process:
            vfiles = list_sources([cfg.validation.images]) if cfg.validation.images else files
            vfiles = list(dict.fromkeys(vfiles))[: cfg.validation.num]
            vds = HQCropDataset(vfiles, cfg.data.crop_size, hflip=False, captions=captions, random=False)
            items = [vds[i] for i in range(len(vds))]
            hq = torch.stack([it["hq"] for it in items])
            vg = torch.Generator(self.device).manual_seed(cfg.validation.seed)
            lq = self.lq_maker(hq, generator=vg).cpu()
            self._val = {"hq": hq, "lq": lq, "captions": [it["caption"] for it in items]}

    def make_dataloader(self, dataset, hint: str = "add images"):
        """The shuffled, seeded, prepared training loader of ``dataset`` (full batches only).

        Raises:
            TrainingError: fewer images than one global batch (``hint`` says what to add).
        """
        cfg = self.cfg
        need = cfg.data.batch_size * self.accelerator.num_processes
        if len(dataset) < need:
            raise TrainingError(f"{len(dataset)} training images for a global batch of {need}: {hint} or lower "
                                "data.batch_size")
        g = torch.Generator().manual_seed(cfg.seed)
        # workers are not persistent: each epoch's workers get the dataset with that epoch set (its crops)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True, generator=g,
            num_workers=cfg.data.num_workers)
        return self.accelerator.prepare(loader)

    # ------------------------------------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [N, 77, C] of ``prompts``, float32 on the training device.

        The most recently used ones are cached on the CPU, at most :attr:`PROMPT_CACHE_BYTES` of them (a
        77 x 1024 float32 embedding is 315 KB: 4096 captions on the GPU would hold 1.3 GB there).
        """
        wanted = list(dict.fromkeys(prompts))
        missing = [p for p in wanted if p not in self._emb_cache]
        fresh = {}
        if missing:
            ids = self.tokenizer(missing, max_length=self.tokenizer.model_max_length, padding="max_length",
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            fresh = dict(zip(missing, self.text_encoder(ids)[0].float()))
        out = torch.stack([fresh[p] if p in fresh else self._emb_cache[p].to(self.device, non_blocking=True)
                           for p in prompts])
        for p in wanted:
            if p in fresh:
                self._emb_cache[p] = fresh[p].cpu()
            self._emb_cache.move_to_end(p)
        size = sum(e.numel() * e.element_size() for e in self._emb_cache.values())
        while self._emb_cache and size > self.PROMPT_CACHE_BYTES:
            _, old = self._emb_cache.popitem(last=False)
            size -= old.numel() * old.element_size()
        return out

    def step_generators(self, step: int) -> tuple[torch.Generator, torch.Generator]:
        """(device generator, CPU generator) for this step and rank."""
        s = (self.cfg.seed * 1_000_003 + step * 7919 + self.accelerator.process_index * 104_729) % (2**62)
        return torch.Generator(self.device).manual_seed(s), torch.Generator().manual_seed(s + 1)

    def batch_prompts(self, captions: list[str], gcpu: torch.Generator) -> list[str]:
        """Captions, or all "" with probability ``null_text_ratio`` (one coin flip per batch, as official)."""
        if torch.rand((), generator=gcpu).item() < self.cfg.data.null_text_ratio:
            return [""] * len(captions)
        return list(captions)

    # ----------------------------------------------------------------------------------- subclass hooks
    def build(self, unet, vae) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_init_checkpoint(self, path: str):
        """Read and check an official checkpoint of this method for ``model.init_checkpoint`` (before any
        model is loaded).

        Raises:
            CheckpointError: another method, other LoRA ranks than the recipe, or a malformed file.
            WeightsNotFoundError: no such file.
        """
        from realisr.errors import CheckpointError
        from realisr.weights.official import load_official_checkpoint

        ckpt = load_official_checkpoint(path, expect=self.method)
        ranks, want, keys = self.init_ranks(ckpt)
        if ranks != want:
            raise CheckpointError(f"{ckpt.name} has LoRA ranks {ranks}, the recipe {want}: set {' / '.join(keys)} "
                                  "to match")
        return ckpt

    def init_ranks(self, ckpt) -> tuple[tuple, tuple, tuple]:  # pragma: no cover - abstract
        """(ranks in ``ckpt``, ranks of the recipe, recipe keys)."""
        raise NotImplementedError

    def load_init_checkpoint(self, ckpt) -> None:  # pragma: no cover - abstract
        """Copy a checked official checkpoint into the freshly built networks."""
        raise NotImplementedError

    def after_prepare(self) -> None:
        """Called once networks, data and optimisers exist (before resume)."""

    def before_step(self, step: int) -> None:
        """Called before optimisation step ``step`` (0-based) starts, e.g. to switch stages."""

    def training_step(self, batch: dict, step: int) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def train_modules(self) -> list:
        """The prepared (DDP) modules that gradient accumulation must cover."""
        raise NotImplementedError  # pragma: no cover

    def official_checkpoint(self) -> dict:  # pragma: no cover - abstract
        """The checkpoint dict in the official .pkl layout."""
        raise NotImplementedError

    def write_official(self, folder: Path) -> None:
        """Write the checkpoint files users load (default: ``<name>.pkl`` in the official layout and its
        ``.safetensors``); methods with another official format override this."""
        from realisr.weights.official import save_pkl, save_safetensors

        official = self.official_checkpoint()
        save_pkl(official, folder / f"{self.checkpoint_name}.pkl")
        save_safetensors(official, folder / f"{self.checkpoint_name}.safetensors")  # validates the layout too

    def generate(self, lq: torch.Tensor, prompts: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        """Eval-mode SR of LQ images in [0,1] (already at the HQ size) -> [0,1]."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- helpers
    def prepare_batch(self, batch: dict, step: int):
        """HQ and LQ in [-1, 1] on the device, prompts, and this step's generators."""
        from realisr.train.data import to_model_range

        gdev, gcpu = self.step_generators(step)
        hq = batch["hq"].to(self.device, torch.float32)
        lq = self.lq_maker(hq, generator=gdev)
        prompts = self.batch_prompts(list(batch["caption"]), gcpu)
        return to_model_range(hq), to_model_range(lq), prompts, gdev

    def clip_and_step(self, optimizer, params: list) -> Optional[float]:
        norm = None
        if self.accelerator.sync_gradients and self.cfg.train.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm) if norm is not None else None

    def make_optimizer(self, params: list):
        t = self.cfg.train
        return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                 weight_decay=t.weight_decay)

    # -------------------------------------------------------------------------------------------- loop
    def train(self) -> dict:
        """Run the recipe to ``train.max_steps``.

        Returns:
            A summary: final step, last losses, steps/s, peak CUDA memory (bytes, 0 on CPU), checkpoint folder.
        """
        if not hasattr(self, "accelerator"):
            self.setup()
        acc = self.accelerator
        cfg = self.cfg
        max_steps = cfg.train.max_steps
        logs: dict[str, float] = {}
        report(self.callback, "train", self.step, max_steps)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0, s0 = time.perf_counter(), self.step
        last_ckpt = None
        while self.step < max_steps:
            skip = self.batch_in_epoch  # > 0 only right after a resume in the middle of an epoch
            loader = acc.skip_first_batches(self.dataloader, skip) if skip else self.dataloader
            loader.set_epoch(self.epoch)  # the shuffle order
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)  # the crops and flips
            for batch in loader:
                if self.step >= max_steps:
                    break
                self.batch_in_epoch += 1
                self.before_step(self.step)
                with acc.accumulate(*self.train_modules()):
                    logs = self.training_step(batch, self.step)
                if not acc.sync_gradients:
                    continue
                self.step += 1
                if not all(math.isfinite(v) for v in logs.values()):
                    raise TrainingError(f"non-finite loss at step {self.step} ({logs}): lower train.lr or use "
                                        "bf16/fp32 (train.mixed_precision)")
                if self.step % cfg.train.log_every == 0 or self.step == max_steps:
                    self._log(logs)
                report(self.callback, "train", self.step, max_steps,
                       " ".join(f"{k}={v:.4g}" for k, v in logs.items()))
                if cfg.train.checkpoint_every > 0 and self.step % cfg.train.checkpoint_every == 0:
                    last_ckpt = self.save_checkpoint()
                if cfg.validation.every > 0 and self.step % cfg.validation.every == 0:
                    self.validate()
            else:
                self.epoch += 1
                self.batch_in_epoch = 0
        elapsed = time.perf_counter() - t0
        if last_ckpt is None or not last_ckpt.name.endswith(f"{self.step:06d}"):
            last_ckpt = self.save_checkpoint()
        if cfg.validation.every > 0 and self.step % cfg.validation.every != 0:
            self.validate()
        acc.wait_for_everyone()
        summary = {"step": self.step, "losses": logs,
                   "steps_per_s": (self.step - s0) / elapsed if elapsed > 0 else 0.0,
                   "peak_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
                   "checkpoint": str(last_ckpt)}
        logger.info("training done: %s", summary)
        acc.end_training()
        return summary

    def _log(self, logs: dict) -> None:
        logger.info("step %d: %s", self.step, " ".join(f"{k}={v:.5g}" for k, v in logs.items()))
        if self.accelerator.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.step, **logs}) + "\n")

    # ------------------------------------------------------------------------------------- checkpoints
    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter that any stage trains, keyed ``<prefix>.<name>`` (for resuming)."""
        out = {}
        for prefix, module in self.trainable.items():
            for name, p in module.named_parameters():
                if id(p) in self._trainable_ids:
                    out[f"{prefix}.{name}"] = p.detach().float().cpu().contiguous()
        return out

    def weights_digest(self) -> str:
        """SHA-256 over every trainable tensor of this process (bit-exact identity check across ranks)."""
        import hashlib

        h = hashlib.sha256()
        for name, t in sorted(self.trainable_tensors().items()):
            h.update(name.encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N/{<name>.pkl, <name>.safetensors, training_state/}``.

        ``<name>.pkl`` has the official layout (loads in the official code and :mod:`realisr.weights.official`);
        ``<name>.safetensors`` is the same content in the format of ``realisr convert``. A method with another
        official layout overrides :meth:`write_official`. ``training_state/`` holds accelerate's ``save_state``
        (optimisers, gradient scaler, every process's RNG states), the trainable tensors and ``state.json``
        (step, data position). Every process takes part; the folder appears complete or not at all.
        """
        from realisr.weights.cache import atomic_save_file

        from accelerate.utils import gather_object

        acc = self.accelerator
        acc.wait_for_everyone()
        folder = self.output_dir / "checkpoints" / f"step-{self.step:06d}"
        tmp = folder.with_name(folder.name + ".tmp")
        # every rank's weights must be identical under DDP: record a digest per rank to prove it
        digests = gather_object([self.weights_digest()]) if acc.num_processes > 1 else [self.weights_digest()]
        if len(set(digests)) > 1:
            logger.warning("step %d: trainable weights differ between processes (%s)", self.step, digests)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "training_state").mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "training_state"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.write_official(tmp)
            atomic_save_file(self.trainable_tensors(), tmp / "training_state" / "trainable.safetensors")
            with open(tmp / "training_state" / "state.json", "w", encoding="utf-8") as f:
                json.dump({"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                           "method": self.method, "seed": self.cfg.seed, "num_processes": acc.num_processes,
                           "rank_weight_digests": digests}, f)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
            self._prune_checkpoints()
            logger.info("checkpoint written: %s", folder)
        acc.wait_for_everyone()
        return folder

    def _prune_checkpoints(self) -> None:
        keep = self.cfg.train.keep_checkpoints
        if keep <= 0:
            return
        folders = sorted((self.output_dir / "checkpoints").glob("step-[0-9]*"))
        for old in folders[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_state(self, folder: Path) -> None:
        """Restore trainable weights, optimisers, gradient scaler, RNG states, step and data position from a
        checkpoint folder."""
        from safetensors.torch import load_file

        state_dir = folder / "training_state"
        state = json.loads((state_dir / "state.json").read_text(encoding="utf-8"))
        if state.get("method") != self.method:
            raise TrainingError(f"{folder} is a {state.get('method')} checkpoint, this recipe trains {self.method}")
        tensors = load_file(str(state_dir / "trainable.safetensors"))
        own = {}
        for prefix, module in self.trainable.items():
            for name, p in module.named_parameters():
                own[f"{prefix}.{name}"] = p
        missing = sorted(set(k for k, p in own.items() if id(p) in self._trainable_ids) - set(tensors))
        unknown = sorted(set(tensors) - set(own))
        if missing or unknown:
            raise TrainingError(f"{folder} does not match this recipe (e.g. {(missing or unknown)[0]}): same method, "
                                "ranks and backbone needed to resume")
        if not (state_dir / "optimizer.bin").is_file():
            raise TrainingError(f"{folder} has no accelerate state (optimizer.bin): it was written by an older "
                                "realisr; start from its .pkl with model.init_checkpoint instead")
        with torch.no_grad():
            for k, v in tensors.items():
                own[k].copy_(v.to(own[k].device, own[k].dtype))
        # optimisers, gradient scaler and RNG states (accelerate loads them with weights_only=True)
        self.accelerator.load_state(str(state_dir))
        self.step = int(state["step"])
        self.epoch = int(state.get("epoch", 0))
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", folder, self.step, self.epoch,
                    self.batch_in_epoch)

    # -------------------------------------------------------------------------------------- validation
    def validate(self) -> Optional[dict]:
        """Write ``validation/step-N.png`` (rows: LQ | SR | HQ) and log PSNR (main process)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        result = None
        if acc.is_main_process and self._val is not None:
            import numpy as np
            from PIL import Image

            lq, hq = self._val["lq"], self._val["hq"]
            with torch.no_grad():
                sr = torch.cat([self.generate(lq[i:i + 1].to(self.device), self._val["captions"][i:i + 1]).cpu()
                                for i in range(lq.shape[0])])
            mse = ((sr - hq) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
            psnr = float((10 * torch.log10(1.0 / mse)).mean())
            rows = torch.cat([torch.cat([lq[i], sr[i], hq[i]], dim=-1) for i in range(lq.shape[0])], dim=-2)
            arr = (rows.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            folder = self.output_dir / "validation"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(arr)).save(folder / f"step-{self.step:06d}.png")
            result = {"step": self.step, "val_psnr": psnr}
            logger.info("validation step %d: PSNR %.2f dB (%s)", self.step, psnr, folder)
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
        acc.wait_for_everyone()
        return result
