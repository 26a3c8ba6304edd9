"""EA-Adam training (``method: ea-adam``; spec and the official code's quirks: docs/ea-adam.md).

Three stages, run in order by :meth:`EAAdamTrainer.train` and each resumable after a kill:

1. ``population``: N generators (MSRResNet or RRDBNet) from one L1-pretrained model, each with its own
   VGG-style discriminator and Adam optimisers. Adam epochs: every individual ``i`` (but the frozen 0) takes
   a step on ``w_i0 * g(L1)/|g(L1)| + w_i1 * g(Perc + 0.005 GAN)/|...|`` per tensor, then its discriminator
   one step. EA epochs (every ``adam_epochs``): SBX crossover, Gaussian mutation and MOEA/D Tchebycheff
   replacement over neighbourhoods, objectives (L1, Perc) measured on a fixed evaluation set.
2. ``fusion``: the population becomes the experts of dynamic convolutions; only the fusion modules train
   (L1 / Perc / GAN weighted), against a discriminator initialised from one of the population's.
3. ``merge``: per-layer fusion weights averaged over M LR images merge the experts into one plain backbone.

Outputs (``output_dir``): ``models/`` official-format population and discriminator files after each EA epoch,
``experts/expert_<i>.pt``, ``fusion/model_fusion.pt``, ``final/final_model_EAdam_x<s>_<backbone>.pt`` (official)
and ``final/final_model.safetensors`` (loads with ``realisr upscale -m``), ``objectives.json``,
``metrics.jsonl``. Resume checkpoints (accelerate ``save_state``: every network, every optimiser, RNG states,
plus the EA state) go to ``checkpoints/``. Every random draw comes from a generator seeded by its position
(seed, epoch, iteration), so a resumed run is the uninterrupted one.
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
import torch.nn.functional as F
from torch import nn

from realisr.errors import RealisrError
from realisr.progress import report
from realisr.train import ea_adam as ops

__all__ = ["EAAdamTrainer", "PatchDataset"]

logger = logging.getLogger(__name__)

_STAGES = ("population", "fusion", "merge")


def _seed(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p) + 7919) % (2 ** 62)
    return s


class PatchDataset(torch.utils.data.Dataset):
    """HQ training patches: entry ``k`` is ``(file index, seed)``; the crop and the flips/transposition come
    from a generator with that seed, so any worker (or a resumed run) makes the same patch."""

    def __init__(self, files, entries, crop: int, augment: bool):
        self.files = list(files)
        self.entries = list(entries)
        self.crop = crop
        self.augment = augment

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, k: int) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        fi, seed = self.entries[k]
        with Image.open(self.files[fi]) as im:
            a = np.asarray(im.convert("RGB"))
        h, w = a.shape[:2]
        c = self.crop
        if min(h, w) < c:
            raise RealisrError(f"training image {self.files[fi]} is smaller than data.crop_size={c}")
        g = torch.Generator().manual_seed(seed)
        y = int(torch.randint(0, h - c + 1, (), generator=g))
        x = int(torch.randint(0, w - c + 1, (), generator=g))
        t = torch.from_numpy(np.ascontiguousarray(a[y:y + c, x:x + c])).permute(2, 0, 1).float() / 255.0
        if self.augment:
            flips = torch.rand(3, generator=g) < 0.5
            if flips[0]:
                t = t.flip(-1)
            if flips[1]:
                t = t.flip(-2)
            if flips[2]:
                t = t.transpose(-1, -2)
        return t.contiguous()


class _EAState:
    """What the EA carries between iterations (saved with accelerate's ``register_for_checkpointing``)."""

    def __init__(self):
        self.objectives: list = []
        self.z_min: list = []
        self.z_max: list = []
        self.replaced: list = []

    def state_dict(self) -> dict:
        return {"objectives": self.objectives, "z_min": self.z_min, "z_max": self.z_max, "replaced": self.replaced}

    def load_state_dict(self, d: dict) -> None:
        self.objectives = [list(map(float, o)) for o in d["objectives"]]
        self.z_min, self.z_max = list(map(float, d["z_min"])), list(map(float, d["z_max"]))
        self.replaced = list(map(int, d["replaced"]))


class EAAdamTrainer:
    """Run an EA-Adam recipe (see the module docstring).

    Args:
        cfg: a :class:`realisr.train.config_sr.EAAdamRecipe`.
        callback: :mod:`realisr.progress` callback (stages ``population``, ``ea``, ``fusion``, ``merge``).
        perceptual: a perceptual loss module to use instead of the recipe's (tests).
    """

    method = "ea-adam"

    def __init__(self, cfg, callback: Optional[Callable] = None, perceptual: Optional[nn.Module] = None):
        self.cfg = cfg
        self.callback = callback
        self.output_dir = Path(cfg.output_dir).expanduser()
        self._perceptual = perceptual
        self.stage = "population"
        self.epoch = 0
        self.iter = 0
        self.ea_state = _EAState()
        self.total_iters = 0

    # =========================================================================================== setup
    def setup(self) -> None:
        cfg, e = self.cfg, self.cfg.ea_adam
        cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
        self.device = torch.device("cpu") if cpu else torch.device(cfg.train.device if cfg.train.device != "auto"
                                                                   else "cuda")
        self._cpu = cpu
        self.perceptual = (self._perceptual or self._build_perceptual()).to(self.device)
        from realisr.train.data import LQMaker, list_sources

        self.files = list_sources(cfg.data.hq)
        self.unique_files = sorted(dict.fromkeys(self.files))
        self.lq_maker = LQMaker(cfg.data.degradation, cfg.data.scale, self.device, resize_back=False)
        torch.manual_seed(cfg.seed)  # initial weights of random backbones / discriminators / fusion modules
        self.template = self._build_backbone().to(self.device).eval()
        from realisr.weights.ea_adam import backbone_of

        self.backbone = backbone_of(self.template)
        self.gens = [copy.deepcopy(self.template).train() for _ in range(e.popsize)]
        from realisr.arch.discriminator_arch import VGGStyleDiscriminator

        self.discs = [VGGStyleDiscriminator(num_feat=e.discriminator_feat, input_size=cfg.data.crop_size)
                      .to(self.device).train() for _ in range(e.popsize)]
        self.opt_g = [torch.optim.Adam(g.parameters(), lr=e.lr) for g in self.gens]
        self.opt_d = [torch.optim.Adam(d.parameters(), lr=e.lr) for d in self.discs]
        self.weights = ops.weight_vectors(e.popsize)
        self.hoods = ops.neighbourhoods(e.popsize, e.neighbour_size)
        self.frozen = (0,) if e.freeze_first else ()
        self.scratch = copy.deepcopy(self.template).eval()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        from realisr.train.config import recipe_to_dict

        (self.output_dir / "recipe.json").write_text(json.dumps(recipe_to_dict(cfg), indent=1))
        self.acc = self._accelerator(self.gens + self.discs, self.opt_g + self.opt_d)
        self._ea_set = None

    def _accelerator(self, models: list, optimizers: list):
        from accelerate import Accelerator

        acc = Accelerator(cpu=self._cpu, mixed_precision="no")
        if acc.num_processes > 1:
            raise RealisrError("EA-Adam trains its population in one process: run it without accelerate launch")
        acc.prepare(*models, *optimizers)
        acc.register_for_checkpointing(self.ea_state)
        return acc

    def _build_perceptual(self) -> nn.Module:
        from realisr.train.losses_gan import PerceptualLoss, load_perceptual_loss

        lw = {k: float(v) for k, v in self.cfg.loss.perceptual_layers.items()}
        width = self.cfg.loss.vgg_random_width
        if width:
            from realisr.arch.vgg_arch import VGG19Features

            logger.warning("perceptual loss on a RANDOM VGG19 of width %g (loss.vgg_random_width): plumbing only, "
                           "the perceptual objective is meaningless", width)
            g = torch.random.fork_rng()
            with g:
                torch.manual_seed(self.cfg.seed + 1)
                return PerceptualLoss(VGG19Features(list(lw), width=width), lw)
        return load_perceptual_loss(lw, self.cfg.loss.vgg_weights)

    def _build_backbone(self) -> nn.Module:
        e = self.cfg.ea_adam
        if e.pretrained:
            from realisr.weights.gan import load_spandrel_file

            desc = load_spandrel_file(e.pretrained)
            want = {"srresnet": "MSRResNet", "rrdb": "ESRGAN"}[e.backbone]
            if desc.architecture.id != want or int(desc.scale) != self.cfg.data.scale:
                raise RealisrError(f"ea_adam.pretrained {e.pretrained} is a x{desc.scale} {desc.architecture.id}, "
                                   f"the recipe trains a x{self.cfg.data.scale} {e.backbone}")
            return desc.model
        kw = dict(e.backbone_kwargs)
        logger.warning("ea_adam.pretrained is null: the population starts from a RANDOM %s", e.backbone)
        if e.backbone == "srresnet":
            from realisr.arch.msrresnet_arch import MSRResNet

            return MSRResNet(num_feat=kw.get("num_feat", 64), num_block=kw.get("num_block", 16),
                             upscale=self.cfg.data.scale)
        from spandrel.architectures.ESRGAN import ESRGAN

        return ESRGAN(in_nc=3, out_nc=3, num_filters=kw.get("num_feat", 64), num_blocks=kw.get("num_block", 23),
                      scale=self.cfg.data.scale)

    # ========================================================================================= helpers
    def _iters_per_epoch(self, override: Optional[int]) -> int:
        if override:
            return int(override)
        return max(1, len(self.files) * self.cfg.data.repeat // self.cfg.data.batch_size)

    @staticmethod
    def _lr(base: float, epoch: int, milestones, gamma: float) -> float:
        return base * gamma ** sum(1 for m in milestones if epoch >= m)

    @staticmethod
    def _set_lr(opt, lr: float) -> None:
        for group in opt.param_groups:
            group["lr"] = lr

    @staticmethod
    def _reset_moments(opt) -> None:
        inner = getattr(opt, "optimizer", opt)
        inner.state.clear()

    def _batches(self, epoch: int, start: int, n_iters: int, salt: int):
        """HQ/LQ batches ``start..n_iters-1`` of an epoch (order and patches seeded by the epoch)."""
        cfg = self.cfg
        b = cfg.data.batch_size
        g = torch.Generator().manual_seed(_seed(cfg.seed, salt, epoch))
        need = n_iters * b
        order = torch.cat([torch.randperm(len(self.files), generator=g)
                           for _ in range(math.ceil(need / len(self.files)))])[:need]
        index = {f: i for i, f in enumerate(self.unique_files)}
        entries = [(index[self.files[int(order[k])]], _seed(cfg.seed, salt, epoch, k)) for k in range(need)]
        ds = PatchDataset(self.unique_files, entries[start * b:], cfg.data.crop_size, cfg.data.augment)
        loader = torch.utils.data.DataLoader(ds, batch_size=b, shuffle=False, num_workers=cfg.data.num_workers)
        for j, hq in enumerate(loader, start=start):
            gl = torch.Generator(self.device).manual_seed(_seed(cfg.seed, salt, epoch, j, 17))
            hq = hq.to(self.device)
            yield j, hq, self.lq_maker(hq, generator=gl)

    def _log(self, record: dict) -> None:
        with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # ===================================================================================== checkpoints
    def _ckpt_name(self) -> str:
        return f"s{_STAGES.index(self.stage)}-{self.stage}-e{self.epoch:05d}-i{self.iter:07d}"

    def save_checkpoint(self) -> Path:
        """A resume point (accelerate state of the current stage + ``state.json``); old ones are pruned."""
        root = self.output_dir / "checkpoints"
        folder = root / self._ckpt_name()
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.acc.save_state(str(tmp / "accelerate"), safe_serialization=True)
        (tmp / "state.json").write_text(json.dumps({"method": self.method, "stage": self.stage, "epoch": self.epoch,
                                                    "iter": self.iter, "total_iters": self.total_iters}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
        keep = self.cfg.train.keep_checkpoints
        found = sorted(p for p in root.glob("s[0-9]-*") if (p / "state.json").is_file())
        for old in found[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def _find_resume(self) -> Optional[Path]:
        from realisr.train.trainer_base import TrainingError

        which = self.cfg.train.resume
        if not which:
            return None
        if which == "latest":
            found = sorted(p for p in (self.output_dir / "checkpoints").glob("s[0-9]-*") if (p / "state.json").is_file())
            return found[-1] if found else None
        p = Path(which).expanduser()
        if not (p / "state.json").is_file():
            raise TrainingError(f"{p} is not an EA-Adam checkpoint folder (no state.json): give a checkpoints/... "
                                "folder or 'latest'")
        return p

    def _resume(self, folder: Path) -> None:
        from realisr.train.trainer_base import TrainingError

        st = json.loads((folder / "state.json").read_text())
        if st.get("method") != self.method:
            raise TrainingError(f"{folder} is a {st.get('method')} checkpoint, this recipe trains {self.method}")
        self.stage, self.epoch, self.iter = st["stage"], int(st["epoch"]), int(st["iter"])
        self.total_iters = int(st.get("total_iters", 0))
        if self.stage != "population":  # the population is final: its expert files hold it
            from realisr.weights.ea_adam import load_official

            for i, g in enumerate(self.gens):
                g.load_state_dict(load_official(self.output_dir / "experts" / f"expert_{i}.pt", self.backbone))
            self._enter_fusion()
        self.acc.load_state(str(folder / "accelerate"))
        logger.info("resumed from %s (%s, epoch %d, iteration %d)", folder, self.stage, self.epoch, self.iter)

    def _write_official(self, folder: str, epoch: int) -> None:
        from realisr.weights.ea_adam import official_model_dict, save_official

        s = self.cfg.data.scale
        for i, (g, d) in enumerate(zip(self.gens, self.discs)):
            save_official(official_model_dict(g.state_dict(), self.backbone, epoch=epoch),
                          self.output_dir / folder / f"model_x{s}_{epoch}_{i}.pt")
            save_official(official_model_dict(d.state_dict(), "discriminator", epoch=epoch),
                          self.output_dir / folder / f"model_d_x{s}_{epoch}_{i}.pt")

    # ===================================================================================== population
    def _adam_step(self, i: int, lq: torch.Tensor, hq: torch.Tensor) -> dict:
        lw = self.cfg.loss
        g, d = self.gens[i], self.discs[i]
        params = list(g.parameters())
        d.requires_grad_(False)
        sr = g(lq)
        l1 = F.l1_loss(sr, hq)
        lp = lw.perceptual * self.perceptual(sr, hq)
        if lw.gan > 0:
            from realisr.train.losses_gan import gan_loss

            lp = lp + lw.gan * gan_loss(d(sr), True)
        g1 = torch.autograd.grad(l1, params, retain_graph=True, allow_unused=True)
        g2 = torch.autograd.grad(lp, params, allow_unused=True)
        w = [float(x) for x in self.weights[i]]
        for p, m in zip(params, ops.mix_normalized_gradients(g1, g2, w)):
            p.grad = m
        self.opt_g[i].step()
        self.opt_g[i].zero_grad(set_to_none=True)
        logs = {f"l1_{i}": float(l1.detach()), f"per_{i}": float(lp.detach())}
        if lw.gan > 0:
            from realisr.train.losses_gan import gan_loss

            d.requires_grad_(True)
            self.opt_d[i].zero_grad(set_to_none=True)
            gan_loss(d(hq), True).backward()
            gan_loss(d(sr.detach()), False).backward()
            self.opt_d[i].step()
        return logs

    def _adam_epoch(self) -> None:
        cfg, e = self.cfg, self.cfg.ea_adam
        n_iters = self._iters_per_epoch(e.iters_per_epoch)
        lr = self._lr(e.lr, self.epoch, e.milestones, e.gamma)
        for opt in self.opt_g + self.opt_d:
            self._set_lr(opt, lr)
        train_ids = [i for i in range(e.popsize) if i not in self.frozen]
        for g in self.gens:
            g.train()
        for j, hq, lq in self._batches(self.epoch, self.iter, n_iters, salt=1):
            logs = {}
            for i in train_ids:
                logs.update(self._adam_step(i, lq, hq))
            self.iter = j + 1
            self.total_iters += 1
            if not all(math.isfinite(v) for v in logs.values()):
                raise RealisrError(f"non-finite loss in epoch {self.epoch} iteration {j}: lower ea_adam.lr")
            if self.iter % cfg.train.log_every == 0 or self.iter == n_iters:
                self._log({"stage": "adam", "epoch": self.epoch, "iter": self.iter, **logs})
                logger.info("epoch %d (Adam) %d/%d: %s", self.epoch, self.iter, n_iters,
                            " ".join(f"{k}={v:.4g}" for k, v in logs.items()))
            report(self.callback, "population", self.iter, n_iters, f"epoch {self.epoch} Adam")
            if cfg.train.checkpoint_every > 0 and self.iter % cfg.train.checkpoint_every == 0 and self.iter < n_iters:
                self.save_checkpoint()

    def _build_ea_set(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The EA evaluation set: the first ``ea_images`` sorted training images, cut into non-overlapping
        ``crop_size`` patches (``ea_patch_range`` of them above ``ea_max_patches``), LQ made once (seeded)."""
        import numpy as np
        from PIL import Image

        cfg, e = self.cfg, self.cfg.ea_adam
        c = cfg.data.crop_size
        out = []
        for k, f in enumerate(self.unique_files[: e.ea_images]):
            with Image.open(f) as im:
                a = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0
            ph, pw = a.shape[1] // c, a.shape[2] // c
            if ph == 0 or pw == 0:
                continue
            patches = a[:, : ph * c, : pw * c].unfold(1, c, c).unfold(2, c, c)  # [3, ph, pw, c, c]
            patches = patches.permute(1, 2, 0, 3, 4).reshape(ph * pw, 3, c, c)
            if patches.shape[0] > e.ea_max_patches:
                lo, hi = e.ea_patch_range
                patches = patches[lo:hi]
            hq = patches.contiguous().to(self.device)
            gl = torch.Generator(self.device).manual_seed(_seed(cfg.seed, 3, k))
            out.append((self.lq_maker(hq, generator=gl), hq))
        if not out:
            raise RealisrError(f"no training image is at least data.crop_size={c} pixels: the EA has nothing to "
                               "evaluate on")
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> list[float]:
        """``[f_distortion, f_perception]``: mean L1 and mean perceptual loss over the EA evaluation set
        (one value per image, averaged; no GAN term)."""
        if self._ea_set is None:
            self._ea_set = self._build_ea_set()
        model.eval()
        l1 = per = 0.0
        for lq, hq in self._ea_set:
            sr = model(lq)
            l1 += float(F.l1_loss(sr, hq))
            per += float(self.cfg.loss.perceptual * self.perceptual(sr, hq))
        n = len(self._ea_set)
        return [l1 / n, per / n]

    @staticmethod
    def _params(model: nn.Module) -> dict:
        return {k: p.detach() for k, p in model.named_parameters()}

    def _make_child(self, i: int, g: torch.Generator) -> dict:
        e = self.cfg.ea_adam
        x_i = self._params(self.gens[i])
        if float(torch.rand((), generator=g)) <= e.p_crossover:
            if float(torch.rand((), generator=g)) <= e.p_global_mate:
                mates = [k for k in range(e.popsize) if k != i]
            else:
                mates = [k for k in self.hoods[i] if k != i]
            mate = mates[int(torch.randint(0, len(mates), (), generator=g))]
            child = ops.sbx_crossover(x_i, self._params(self.gens[mate]), eta=e.sbx_eta, generator=g)
        else:
            child = {k: v.clone() for k, v in x_i.items()}
        if float(torch.rand((), generator=g)) <= e.p_mutation:
            child = ops.gaussian_mutation(child, x_i, mu=e.mutation_rate, sigma=e.mutation_sigma,
                                          keep_child_bias=e.keep_child_bias, generator=g)
        return child

    @torch.no_grad()
    def _ea_epoch(self) -> None:
        cfg, e = self.cfg, self.cfg.ea_adam
        st = self.ea_state
        if self.iter == 0:  # entering EA: objectives of the population, ideal and nadir points
            st.objectives = [self.evaluate(g) for g in self.gens]
            st.z_min = [min(o[k] for o in st.objectives) for k in range(2)]
            st.z_max = [max(o[k] for o in st.objectives) for k in range(2)]
            st.replaced = []
            self._log({"stage": "ea-start", "epoch": self.epoch, "objectives": st.objectives})
        for j in range(self.iter, e.ea_iters):
            g = torch.Generator().manual_seed(_seed(cfg.seed, 2, self.epoch, j))
            for i in range(e.popsize):
                child = self._make_child(i, g)
                self.scratch.load_state_dict(child, strict=False)
                f_child = self.evaluate(self.scratch)
                for r in ops.moead_replace(st.objectives, f_child, self.hoods[i], self.weights, st.z_min, st.z_max,
                                           frozen=self.frozen):
                    for k, p in self.gens[r].named_parameters():
                        p.copy_(child[k])
                    if r not in st.replaced:
                        st.replaced.append(r)
            self.iter = j + 1
            self.total_iters += 1
            if self.iter % max(1, cfg.train.log_every) == 0 or self.iter == e.ea_iters:
                self._log({"stage": "ea", "epoch": self.epoch, "iter": self.iter, "objectives": st.objectives,
                           "z_min": st.z_min, "z_max": st.z_max})
            report(self.callback, "ea", self.iter, e.ea_iters, f"epoch {self.epoch} EA")
            if cfg.train.checkpoint_every > 0 and self.iter % cfg.train.checkpoint_every == 0 \
                    and self.iter < e.ea_iters:
                self.save_checkpoint()
        reset = {"all": range(e.popsize), "replaced": st.replaced, "none": ()}[e.reset_moments]
        for i in reset:
            self._reset_moments(self.opt_g[i])

    def _population(self) -> None:
        e = self.cfg.ea_adam
        while self.epoch < e.epochs:
            kind = ops.epoch_kind(self.epoch, e.adam_epochs)
            if kind == "ea":
                self._ea_epoch()
                self._write_official("models", self.epoch)
            else:
                self._adam_epoch()
            self.epoch += 1
            self.iter = 0
            self.save_checkpoint()
        for i, g in enumerate(self.gens):
            from realisr.weights.ea_adam import official_model_dict, save_official

            save_official(official_model_dict(g.state_dict(), self.backbone, epoch=self.epoch),
                          self.output_dir / "experts" / f"expert_{i}.pt")
        objectives = [self.evaluate(g) for g in self.gens]
        (self.output_dir / "objectives.json").write_text(json.dumps(
            {"weights": self.weights.tolist(), "objectives": objectives}, indent=1))
        self.population_objectives = objectives

    # ========================================================================================= fusion
    def _enter_fusion(self) -> None:
        """Build the fusion network over the population and its discriminator; switch the checkpointed
        objects to this stage's."""
        fu = self.cfg.fusion
        self.experts = [{k: v.detach().clone() for k, v in g.state_dict().items()} for g in self.gens]
        self.fusion_net = ops.make_dynamic(self.template, self.experts, fusion_kwargs={
            "num_feat": fu.num_feat, "num_params": fu.num_params, "hidden": fu.hidden}).to(self.device)
        self.fusion_disc = copy.deepcopy(self.discs[fu.discriminator_from]).train()
        fparams = [p for p in self.fusion_net.parameters() if p.requires_grad]
        self.opt_f = torch.optim.Adam(fparams, lr=fu.lr)
        self.opt_fd = torch.optim.Adam(self.fusion_disc.parameters(), lr=fu.lr)
        self.acc = self._accelerator([self.fusion_net, self.fusion_disc], [self.opt_f, self.opt_fd])

    def _fusion(self) -> None:
        from realisr.train.losses_gan import gan_loss

        cfg, fu = self.cfg, self.cfg.fusion
        n_iters = self._iters_per_epoch(fu.iters_per_epoch)
        while self.epoch < fu.epochs:
            lr = self._lr(fu.lr, self.epoch, fu.milestones, fu.gamma)
            self._set_lr(self.opt_f, lr)
            self._set_lr(self.opt_fd, lr)
            self.fusion_net.train()
            for j, hq, lq in self._batches(self.epoch, self.iter, n_iters, salt=4):
                d = self.fusion_disc
                d.requires_grad_(False)
                sr = self.fusion_net(lq)
                l1 = F.l1_loss(sr, hq)
                loss = fu.l1 * l1 + fu.perceptual * self.perceptual(sr, hq)
                if fu.gan > 0:
                    loss = loss + fu.gan * gan_loss(d(sr), True)
                self.opt_f.zero_grad(set_to_none=True)
                loss.backward()
                self.opt_f.step()
                if fu.gan > 0:
                    d.requires_grad_(True)
                    self.opt_fd.zero_grad(set_to_none=True)
                    gan_loss(d(hq), True).backward()
                    gan_loss(d(sr.detach()), False).backward()
                    self.opt_fd.step()
                self.iter = j + 1
                self.total_iters += 1
                logs = {"loss": float(loss.detach()), "l1": float(l1.detach())}
                if self.iter % cfg.train.log_every == 0 or self.iter == n_iters:
                    self._log({"stage": "fusion", "epoch": self.epoch, "iter": self.iter, **logs})
                report(self.callback, "fusion", self.iter, n_iters, f"epoch {self.epoch}")
                if cfg.train.checkpoint_every > 0 and self.iter % cfg.train.checkpoint_every == 0 \
                        and self.iter < n_iters:
                    self.save_checkpoint()
            self.epoch += 1
            self.iter = 0
            self.save_checkpoint()
        from realisr.weights.ea_adam import official_model_dict, save_official

        state = self.fusion_net.state_dict()
        save_official(official_model_dict(state, self.backbone, epoch=self.epoch),
                      self.output_dir / "fusion" / "model_fusion.pt")

    # ========================================================================================== merge
    def _merge_images(self):
        from realisr.train.data import list_sources

        cfg, mg = self.cfg, self.cfg.merge
        import numpy as np
        from PIL import Image

        if mg.images:  # LR images as given
            for f in sorted(dict.fromkeys(list_sources([mg.images])))[: mg.num]:
                with Image.open(f) as im:
                    a = np.asarray(im.convert("RGB")).copy()
                yield torch.from_numpy(a).permute(2, 0, 1)[None].float().div(255.0).to(self.device)
            return
        for k, f in enumerate(self.unique_files[: mg.num]):  # training images, degraded like the training LQ
            with Image.open(f) as im:
                a = np.asarray(im.convert("RGB")).copy()
            s = cfg.data.scale
            hq = torch.from_numpy(a).permute(2, 0, 1)[None].float().div(255.0)
            hq = hq[..., : hq.shape[-2] // s * s, : hq.shape[-1] // s * s].to(self.device)
            gl = torch.Generator(self.device).manual_seed(_seed(cfg.seed, 5, k))
            yield self.lq_maker(hq, generator=gl)

    def _merge(self) -> Path:
        from realisr.weights.cache import atomic_save_file
        from realisr.weights.ea_adam import official_model_dict, save_official

        report(self.callback, "merge", 0, 1)
        weights = ops.collect_fusion_weights(self.fusion_net, self._merge_images(),
                                             center_half=self.cfg.merge.center_half)
        merged = ops.merge_experts(self.experts, weights)
        folder = self.output_dir / "final"
        s = self.cfg.data.scale
        path = save_official(official_model_dict(merged, self.backbone),
                             folder / f"final_model_EAdam_x{s}_{self.backbone}.pt")
        atomic_save_file(merged, folder / "final_model.safetensors",
                         metadata={"method": "ea-adam", "backbone": self.backbone})
        (folder / "fusion_weights.json").write_text(json.dumps({k: v.tolist() for k, v in weights.items()}, indent=1))
        self.merged = merged
        report(self.callback, "merge", 1, 1)
        return path

    # ========================================================================================= driver
    def train(self) -> dict:
        """Run (or resume) population, fusion and merge. Returns a summary (paths, objectives, seconds)."""
        if not hasattr(self, "acc"):
            self.setup()
        t0 = time.perf_counter()
        folder = self._find_resume()
        if folder is not None:
            self._resume(folder)
        if self.stage == "population":
            self._population()
            self.stage, self.epoch, self.iter = "fusion", 0, 0
            self._enter_fusion()
        if self.stage == "fusion":
            self._fusion()
            self.stage = "merge"
        path = self._merge()
        elapsed = time.perf_counter() - t0
        objectives = json.loads((self.output_dir / "objectives.json").read_text())["objectives"]
        summary = {"step": self.total_iters, "model": str(path),
                   "safetensors": str(self.output_dir / "final" / "final_model.safetensors"),
                   "objectives": objectives, "seconds": elapsed,
                   "steps_per_s": self.total_iters / elapsed if elapsed > 0 else 0.0}
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        logger.info("EA-Adam done: %s", summary)
        return summary
