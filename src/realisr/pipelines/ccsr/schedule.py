"""CCSR's truncated, non-uniform timestep schedules (v2 and v1) and the DDPM maths they step with.

Both versions do the same thing on different grids: one step from ``T = 999`` straight to an ``x0`` estimate,
re-noise that estimate to ``t_max``, run a few ancestral DDPM steps down to ``t_min`` and return the ``x0``
predicted at ``t_min`` (the *truncated* output) instead of denoising to 0.

v2 (:func:`truncated_schedule`, ``test_ccsr_tile.py`` + ``pipeline_ccsr.py``): diffusers' DDPM grid,
``set_timesteps(N)`` with "leading" spacing and ``steps_offset = 1`` (N=6: ``[831, 665, 499, 333, 167, 1]``).

* ``t_tau = timesteps[-round(N * t_max)]``; loop = ``timesteps[-round(N * t_max):]``, minus its last
  ``round(N * t_min)`` entries when ``t_min > 0``. Python's ``round`` (half to even), as the official code.
* ``N == 1``: no loop; the output is the one-shot ``x0`` (the re-noise draw still happens officially).
* ``t_min > 0``: the output is the ``x0`` predicted at the last loop step, from that step's input latent; the
  DDPM step taken there is discarded. ``t_min == 0``: the output is the last DDPM step's ``prev_sample``.
* Each DDPM step goes from ``t`` to ``t - 1000 // N`` (``fixed_small`` variance, no clipping).

v1 (:func:`spaced_schedule`, ``model/q_sampler.py::sample_ccsr``): the IDDPM respacing of the 1000-step
schedule to 45 steps (``space_timesteps(1000, "45")``: ``t_k = round(k * 999 / 44)`` accumulated in float,
``[0, 23, 45, ..., 976, 999]``), betas recomputed for the spaced chain (its ``alphas_cumprod`` are the original
ones at those timesteps):

* start ``x_T ~ N(0, I)`` (pure noise); ``x0`` at spaced index ``n - 1`` (t = 999);
* re-noise to spaced index ``round((n - 1) * t_max)`` (29: t = 658);
* loop over the flipped index list, its last ``round(n * t_max)`` entries (29..0) minus the last
  ``round(n * t_min)`` (15): indices 29..15, i.e. 15 ancestral steps from t = 658 to t = 341;
* output: the ``x0`` predicted at the last step (t = 341). 1 + 15 = 16 network evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..diffusion_common import ddpm_step  # noqa: F401  (the one DDPM step, shared with SeeSR)

__all__ = ["TruncatedSchedule", "truncated_schedule", "space_timesteps", "spaced_schedule", "leading_timesteps",
           "predict_x0", "add_noise", "ddpm_step"]


@dataclass(frozen=True)
class TruncatedSchedule:
    """A truncated CCSR schedule.

    Attributes:
        timesteps: the full inference grid (descending; v2: the scheduler's, v1: the spaced timesteps).
        t_start: the one-shot timestep (999).
        t_tau: the timestep the one-shot ``x0`` is re-noised to.
        loop: the loop timesteps, in order.
        prev: the timestep each loop step's DDPM step goes to (-1: the clean end of the chain).
        one_step: ``N == 1``: the output is the one-shot ``x0`` (no loop).
        truncated: ``t_min > 0``: the output is the ``x0`` predicted at the last loop step.
    """

    timesteps: tuple
    t_start: int
    t_tau: int
    loop: tuple = field(default_factory=tuple)
    prev: tuple = field(default_factory=tuple)
    one_step: bool = False
    truncated: bool = True

    @property
    def network_evaluations(self) -> int:
        """UNet + ControlNet evaluations (a CFG step counts once; its batch is doubled)."""
        return 1 + (0 if self.one_step else len(self.loop))


def _check(steps: int, t_max: float, t_min: float, n_tau: int, n_min: int) -> None:
    if steps > 1:
        if n_tau < 1:
            raise ValueError(f"t_max={t_max} keeps no step of {steps}: round(steps * t_max) must be >= 1")
        if t_min > 0 and n_min < 1:
            raise ValueError(f"t_min={t_min} rounds to 0 of {steps} steps (round(steps * t_min) = 0): use "
                             "t_min=0 (no truncation) or a larger t_min")
        if n_min >= n_tau:
            raise ValueError(f"t_min={t_min} leaves no loop step below t_max={t_max} with {steps} steps: "
                             "round(steps * t_min) must be < round(steps * t_max)")


def leading_timesteps(steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> tuple:
    """diffusers' DDPM "leading" grid: ``[(steps - 1 - i) * (T // steps) + steps_offset]``."""
    ratio = num_train_timesteps // steps
    return tuple(i * ratio + steps_offset for i in reversed(range(steps)))


def truncated_schedule(steps: int, t_max: float, t_min: float, *, timesteps=None, num_train_timesteps: int = 1000,
                       start: int = 999) -> TruncatedSchedule:
    """The v2 schedule (see the module docstring).

    Args:
        steps: ``N`` (``num_inference_steps``).
        t_max, t_min: fractions of the grid (0 <= t_min < t_max <= 1).
        timesteps: the scheduler's grid after ``set_timesteps(N)`` (default: :func:`leading_timesteps`).
        num_train_timesteps: 1000.
        start: the one-shot timestep (``--start_steps``, 999).

    Raises:
        ValueError: settings that leave an empty loop.
    """
    ts = tuple(int(t) for t in (timesteps if timesteps is not None else leading_timesteps(steps, num_train_timesteps)))
    n_tau = round(steps * t_max)
    n_min = round(steps * t_min) if t_min > 0 else 0
    _check(steps, t_max, t_min, n_tau, n_min)
    if steps == 1:
        return TruncatedSchedule(ts, start, ts[-1], one_step=True, truncated=False)
    loop = ts[-n_tau:]
    if t_min > 0:
        loop = loop[:-n_min]
    ratio = num_train_timesteps // steps
    prev = tuple(t - ratio for t in loop)
    return TruncatedSchedule(ts, start, ts[-n_tau], tuple(loop), tuple(max(p, -1) for p in prev),
                             one_step=False, truncated=t_min > 0)


def space_timesteps(num_timesteps: int, count: int) -> tuple:
    """IDDPM ``space_timesteps(num_timesteps, str(count))`` for one section: ascending spaced timesteps."""
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1.0
    cur, out = 0.0, []
    for _ in range(count):
        out.append(round(cur))
        cur += stride
    return tuple(sorted(set(out)))


def spaced_schedule(steps: int = 45, t_max: float = 0.6667, t_min: float = 0.3333,
                    num_train_timesteps: int = 1000) -> TruncatedSchedule:
    """The v1 schedule on the IDDPM-spaced grid (see the module docstring)."""
    spaced = space_timesteps(num_train_timesteps, steps)
    n = len(spaced)
    n_tau = round(n * t_max)
    n_min = round(n * t_min) if t_min > 0 else 0
    _check(max(n, 2), t_max, t_min, n_tau, n_min)
    flipped = list(reversed(range(n)))                   # spaced indices n-1 .. 0
    loop_idx = flipped[-n_tau:]
    if n_min:
        loop_idx = loop_idx[:-n_min]
    tau_idx = round((n - 1) * t_max)
    prev = tuple(spaced[i - 1] if i > 0 else -1 for i in loop_idx)
    return TruncatedSchedule(tuple(reversed(spaced)), spaced[-1], spaced[tau_idx],
                             tuple(spaced[i] for i in loop_idx), prev, one_step=False, truncated=t_min > 0)


# ------------------------------------------------------------------------------------------------------------
# DDPM maths (epsilon prediction), in float32 as diffusers' DDPMScheduler computes it
def _abar(alphas_cumprod, t: int):
    import torch

    if t < 0:
        return torch.tensor(1.0, dtype=torch.float32)
    return alphas_cumprod[int(t)].to(torch.float32)


def predict_x0(z, eps, alphas_cumprod, t: int):
    """``x0 = (z - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
    a = _abar(alphas_cumprod, t).to(z.device)
    return (z - (1 - a) ** 0.5 * eps) / a ** 0.5


def add_noise(x0, noise, alphas_cumprod, t: int):
    """``q(x_t | x0)``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
    a = _abar(alphas_cumprod, t).to(x0.device)
    return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise
