"""The fidelity delta of a registered GAN model (``method: realesrgan-fidelity``; docs/fidelity-dial.md).

The base network (Real-ESRGAN x4plus, spandrel ``RRDBNet``) is tuned towards L1 on real photos degraded
with realisr's Real-ESRGAN pipeline; only the last ``train_blocks`` trunk blocks, ``conv_body`` and the
upsampling / HR convolutions change. The result is stored as a delta ``W_fid - W`` (float16 by default), which
the pipeline's ``fidelity`` dial adds back scaled: ``W(F) = W + F * delta``.

Why it fits a 2-core CPU: the frozen part of the trunk runs once per patch (its output is cached on disk in
shards); every optimiser step then runs only the trained blocks and the tail on cached features.

Stages, each resumable after a kill: ``cache`` (shards already written are kept), ``train`` (accelerate
``save_state`` every ``train.checkpoint_every`` steps: weights, Adam moments, RNG; the batch of step ``s`` is
drawn from a generator seeded by ``(seed, s)``), ``export`` (the delta file).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from realisr.errors import RealisrError
from realisr.progress import report

__all__ = ["FidelityTrainer", "FidelityTail", "split_rrdbnet", "gaussian_lowpass"]

logger = logging.getLogger(__name__)

_SHARD = 16  # patches per cache shard


def gaussian_lowpass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (std ``sigma`` pixels, radius ``ceil(3 sigma)``, reflect padding) per channel."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    c = x.shape[1]
    y = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")
    y = torch.nn.functional.conv2d(y, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return torch.nn.functional.conv2d(y, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class FidelityTail(nn.Module):
    """The trained part of an x4 RRDBNet: ``tail(fea0 + blocks(h))`` with ``blocks`` = the last trunk blocks
    and ``conv_body``; ``fea0`` is the first convolution's output and ``h`` the output of the frozen blocks."""

    def __init__(self, blocks: nn.Module, tail: nn.Module):
        super().__init__()
        self.blocks = blocks
        self.tail = tail

    def forward(self, fea0: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.tail(fea0 + self.blocks(h))


def split_rrdbnet(model: nn.Module, train_blocks: int):
    """``(head, frozen_trunk, trained_blocks, tail, prefixes)`` of a spandrel ``RRDBNet``: ``head`` = first conv,
    ``frozen_trunk`` = the first ``nb - train_blocks`` RRDBs, ``trained_blocks`` = the rest of the trunk with
    ``conv_body``, ``tail`` = upsampling and output convolutions; ``prefixes`` are the parameter-name prefixes
    of the trained modules in ``model``.

    Raises:
        RealisrError: not an RRDBNet, or more blocks asked than it has.
    """
    seq = getattr(model, "model", None)
    if type(model).__name__ != "RRDBNet" or seq is None or not hasattr(seq[1], "sub"):
        raise RealisrError(f"the fidelity delta trains spandrel RRDBNet models, not {type(model).__name__}")
    trunk = seq[1].sub
    nb = len(trunk) - 1
    if not 0 <= train_blocks <= nb:
        raise RealisrError(f"fidelity.train_blocks must be in [0, {nb}], got {train_blocks}")
    frozen = nn.Sequential(*[trunk[i] for i in range(nb - train_blocks)])
    blocks = nn.Sequential(*[trunk[i] for i in range(nb - train_blocks, nb + 1)])
    tail = nn.Sequential(*list(seq)[2:])
    prefixes = [f"model.1.sub.{i}." for i in range(nb - train_blocks, nb + 1)]
    prefixes += [f"model.{i}." for i in range(2, len(seq))]
    return seq[0], frozen, blocks, tail, prefixes


class FidelityTrainer:
    """Train and export a fidelity delta (see the module docstring).

    Args:
        cfg: a :class:`realisr.train.config_sr.FidelityRecipe`.
        callback: :mod:`realisr.progress` callback (stages ``cache``, ``train``).
        descriptor: the base model's spandrel descriptor (default: loaded from the registry; tests pass a tiny
            one).
    """

    method = "realesrgan-fidelity"

    def __init__(self, cfg, callback: Optional[Callable] = None, descriptor=None):
        self.cfg = cfg
        self.callback = callback
        self.output_dir = Path(cfg.output_dir).expanduser()
        self.descriptor = descriptor
        self.step = 0

    # ------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from accelerate import Accelerator

        cfg = self.cfg
        if self.descriptor is None:
            from realisr.registry import get_spec
            from realisr.weights.gan import load_gan_descriptor

            self.spec = get_spec(cfg.fidelity.model)
            self.descriptor = load_gan_descriptor(self.spec)
        else:
            self.spec = None
        cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
        self.accelerator = Accelerator(cpu=cpu, mixed_precision="no")
        if self.accelerator.num_processes > 1:
            raise RealisrError("the fidelity trainer runs in one process: launch it without accelerate launch")
        self.device = self.accelerator.device
        model = self.descriptor.model.eval().requires_grad_(False)
        self.base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.head, self.frozen, blocks, tail, self.prefixes = split_rrdbnet(model, cfg.fidelity.train_blocks)
        self.head.to(self.device)
        self.frozen.to(self.device)
        self.net = FidelityTail(blocks, tail).to(self.device).train().requires_grad_(True)
        self.model = model
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.fidelity.lr)
        self.net, self.optimizer = self.accelerator.prepare(self.net, self.optimizer)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        from realisr.train.config import recipe_to_dict

        (self.output_dir / "recipe.json").write_text(json.dumps(recipe_to_dict(cfg), indent=1))

    # ------------------------------------------------------------------------------------------- cache
    def _files(self) -> list[Path]:
        from realisr.train.data import list_sources

        return sorted(dict.fromkeys(list_sources(self.cfg.data.hq)))

    def _patches(self, shard: int, files: list[Path]) -> torch.Tensor:
        """The HQ patches of one shard: patch ``p`` is a random crop of ``files[p % len(files)]`` drawn from a
        generator seeded by ``(seed, p)``."""
        import numpy as np
        from PIL import Image

        c = self.cfg.data.crop_size
        n = self.cfg.fidelity.num_patches
        out = []
        cache: dict = {}
        for p in range(shard * _SHARD, min(n, (shard + 1) * _SHARD)):
            f = files[p % len(files)]
            if f not in cache:
                with Image.open(f) as im:
                    cache = {f: np.asarray(im.convert("RGB"))}
            a = cache[f]
            h, w = a.shape[:2]
            if min(h, w) < c:
                raise RealisrError(f"training photo {f} is smaller than the {c}-pixel crop: lower data.crop_size")
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + p)
            y = int(torch.randint(0, h - c + 1, (), generator=g))
            x = int(torch.randint(0, w - c + 1, (), generator=g))
            t = torch.from_numpy(np.ascontiguousarray(a[y:y + c, x:x + c])).permute(2, 0, 1).float() / 255.0
            if self.cfg.data.augment:
                if torch.rand((), generator=g) < 0.5:
                    t = t.flip(-1)
                if torch.rand((), generator=g) < 0.5:
                    t = t.flip(-2)
                if torch.rand((), generator=g) < 0.5:
                    t = t.transpose(-1, -2)
            out.append(t)
        return torch.stack(out)

    @torch.no_grad()
    def build_cache(self) -> Path:
        """Degrade the patches and run the frozen trunk once; shards already on disk are kept (resume)."""
        from safetensors.torch import save_file

        from realisr.train.data import LQMaker

        cfg = self.cfg
        folder = self.output_dir / "cache"
        folder.mkdir(parents=True, exist_ok=True)
        files = self._files()
        maker = LQMaker(cfg.data.degradation, cfg.data.scale, "cpu", resize_back=False)
        n_shards = math.ceil(cfg.fidelity.num_patches / _SHARD)
        report(self.callback, "cache", 0, n_shards)
        for s in range(n_shards):
            path = folder / f"shard-{s:05d}.safetensors"
            if path.is_file():
                report(self.callback, "cache", s + 1, n_shards)
                continue
            hq = self._patches(s, files)
            lq = maker(hq, generator=torch.Generator().manual_seed(cfg.seed * 7919 + s))
            fea0 = self.head(lq.to(self.device))
            h = self.frozen(fea0)
            tmp = path.with_suffix(".tmp")
            save_file({"hq": hq.contiguous(), "lq": lq.contiguous(), "fea0": fea0.float().cpu().contiguous(),
                       "h": h.float().cpu().contiguous()}, str(tmp))
            tmp.replace(path)
            report(self.callback, "cache", s + 1, n_shards)
        return folder

    def _load_cache(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        shards = sorted((self.output_dir / "cache").glob("shard-*.safetensors"))
        parts = [load_file(str(p)) for p in shards]
        return {k: torch.cat([p[k] for p in parts]) for k in ("hq", "fea0", "h")}

    @torch.no_grad()
    def _base_outputs(self, data: dict) -> torch.Tensor:
        """The base model's outputs on the cached patches (the texture target of ``lowpass-l1``), computed with
        the released weights before any step (also after a resume)."""
        model0 = copy.deepcopy(self.model)
        model0.load_state_dict(self.base_state)
        _, _, blocks0, tail0, _ = split_rrdbnet(model0, self.cfg.fidelity.train_blocks)
        base = FidelityTail(blocks0, tail0).to(self.device).eval()
        outs = []
        for i in range(0, data["h"].shape[0], 8):
            outs.append(base(data["fea0"][i:i + 8].to(self.device), data["h"][i:i + 8].to(self.device)).cpu())
        return torch.cat(outs)

    # ------------------------------------------------------------------------------------------- train
    def _lr(self, step: int) -> float:
        f = self.cfg.fidelity
        return f.lr_min + 0.5 * (f.lr - f.lr_min) * (1 + math.cos(math.pi * step / max(1, f.steps)))

    def _checkpoints(self) -> list[Path]:
        return sorted((self.output_dir / "checkpoints").glob("step-[0-9]*"))

    def save_state(self) -> Path:
        folder = self.output_dir / "checkpoints" / f"step-{self.step:06d}"
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.save_state(str(tmp / "accelerate"), safe_serialization=True)
        (tmp / "state.json").write_text(json.dumps({"step": self.step, "method": self.method}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
        keep = self.cfg.train.keep_checkpoints
        for old in self._checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def load_state(self, which: str) -> None:
        from realisr.train.trainer_base import TrainingError

        if which == "latest":
            found = [p for p in self._checkpoints() if (p / "state.json").is_file()]
            if not found:
                logger.info("no checkpoint in %s: starting afresh", self.output_dir / "checkpoints")
                return
            folder = found[-1]
        else:
            folder = Path(which).expanduser()
            if not (folder / "state.json").is_file():
                raise TrainingError(f"{folder} is not a fidelity checkpoint folder (no state.json)")
        state = json.loads((folder / "state.json").read_text())
        if state.get("method") != self.method:
            raise TrainingError(f"{folder} is a {state.get('method')} checkpoint, not {self.method}")
        self.accelerator.load_state(str(folder / "accelerate"))
        self.step = int(state["step"])
        logger.info("resumed from %s at step %d", folder, self.step)

    def train(self) -> dict:
        """Cache, train, export; returns a summary with the delta path."""
        if not hasattr(self, "accelerator"):
            self.setup()
        cfg = self.cfg
        f = cfg.fidelity
        t0 = time.perf_counter()
        self.build_cache()
        t_cache = time.perf_counter() - t0
        data = self._load_cache()
        if f.objective == "lowpass-l1":
            data["gan"] = self._base_outputs(data)
        if cfg.train.resume:
            self.load_state(cfg.train.resume)
        n = data["hq"].shape[0]
        logs: dict = {}
        report(self.callback, "train", self.step, f.steps)
        t1, s0 = time.perf_counter(), self.step
        while self.step < f.steps:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 104_729 * (self.step + 1))
            idx = torch.randint(0, n, (f.batch_size,), generator=g)
            fea0, h, hq = (data[k][idx].to(self.device) for k in ("fea0", "h", "hq"))
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr(self.step)
            out = self.net(fea0, h)
            if f.objective == "l1":
                loss = f.l1 * (out - hq).abs().mean()
            else:  # structure and colour from the HQ, texture from the base model
                gan = data["gan"][idx].to(self.device)
                low = gaussian_lowpass(out, f.sigma)
                loss = f.l1 * (low - gaussian_lowpass(hq, f.sigma)).abs().mean() \
                    + f.texture * ((out - low) - (gan - gaussian_lowpass(gan, f.sigma))).abs().mean()
            self.optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.step += 1
            logs = {"l1": float(loss.detach()), "lr": self._lr(self.step - 1)}
            if not math.isfinite(logs["l1"]):
                raise RealisrError(f"non-finite loss at step {self.step}: lower fidelity.lr")
            if self.step % cfg.train.log_every == 0 or self.step == f.steps:
                logger.info("step %d: l1=%.5f lr=%.3g", self.step, logs["l1"], logs["lr"])
                with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": self.step, **logs}) + "\n")
            report(self.callback, "train", self.step, f.steps, f"l1={logs['l1']:.4g}")
            if cfg.train.checkpoint_every > 0 and self.step % cfg.train.checkpoint_every == 0:
                self.save_state()
        t_train = time.perf_counter() - t1
        path = self.export()
        summary = {"step": self.step, "losses": logs, "delta": str(path), "bytes": path.stat().st_size,
                   "seconds_cache": t_cache, "seconds_train": t_train,
                   "steps_per_s": (self.step - s0) / t_train if t_train > 0 else 0.0}
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        logger.info("fidelity delta done: %s", summary)
        return summary

    # ------------------------------------------------------------------------------------------ export
    def delta(self) -> dict[str, torch.Tensor]:
        """name -> ``W_trained - W_base`` for every trained tensor (the base model's parameter names)."""
        current = self.model.state_dict()
        out = {}
        for k, base in self.base_state.items():
            if any(k.startswith(p) for p in self.prefixes):
                out[k] = (current[k].detach().float().cpu() - base.float()).contiguous()
        return out

    def export(self) -> Path:
        """Write the delta (safetensors, ``fidelity.delta_dtype``) with its provenance in the metadata."""
        from realisr.weights.cache import atomic_save_file
        from realisr.weights.fidelity import DELTA_FORMAT, base_fingerprint

        f = self.cfg.fidelity
        dtype = getattr(torch, f.delta_dtype)
        tensors = {k: v.to(dtype) for k, v in self.delta().items()}
        path = Path(f.out).expanduser() if f.out else self.output_dir / f"{f.model}-fidelity.safetensors"
        from realisr.train.config import recipe_to_dict

        meta = {"format": DELTA_FORMAT, "base_model": f.model,
                "base_fingerprint": base_fingerprint({k: self.base_state[k] for k in tensors}),
                "steps": str(self.step), "recipe": json.dumps(recipe_to_dict(self.cfg)),
                "training_photos": json.dumps([p.name for p in self._files()]),
                "license": "BSD-3-Clause: a derivative of the Real-ESRGAN x4plus weights (Copyright (c) 2021, "
                           "Xintao Wang); see NOTICE next to the file"}
        atomic_save_file(tensors, path, metadata=meta)
        logger.info("fidelity delta written: %s (%d tensors, %.2f MB)", path, len(tensors),
                    path.stat().st_size / 1e6)
        return path
