"""What this CPU offers realisr: bf16 matrix units, and the physical cores this process may use.

``dtype="auto"`` on the CPU runs a model in bf16 only where the CPU has **AMX-BF16** tile units (Intel Xeon
Sapphire Rapids and later): there, bf16 Real-ESRGAN measured ~4x faster than fp32 (see
``benchmarks/bench_gan.py``). With AVX512-BF16 alone (Cooper Lake, AMD Zen 4), bf16 measured *slower* than
fp32 (PyTorch 2.14's oneDNN, emulated here with ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``: 1.5x fp32's time),
and on a CPU without either (AVX2 / plain AVX-512) bf16 is emulated and several times slower, so those get
fp32. AVX512-BF16 is reported (benchmarks print it) but does not switch ``auto`` to bf16.

Detection asks PyTorch (``torch.cpu.get_capabilities()``, PyTorch >= 2.9) and falls back to the flags of
``/proc/cpuinfo``; the result is cached. ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) set below AMX
means oneDNN will not use the tiles: the units are then reported unusable. ``REALISR_CPU_BF16=0`` makes
realisr itself treat them as absent (``auto`` stays fp32; oneDNN is untouched, so an explicit ``bf16`` still
runs on the tiles); the test suite sets it so that its results do not depend on the CPU it runs on.

Threads: :func:`default_threads` is the number of *physical* cores this process may run on (its CPU
affinity, a cgroup CPU quota), or ``OMP_NUM_THREADS`` when set. Hyper-threads share a core's matrix units,
so more threads than cores only add contention.

Memory: :func:`keep_freed_memory` (called by the command line, never by the library) makes glibc keep freed
blocks for reuse. CPU inference allocates every layer's activations afresh (64-192 MB each for Real-ESRGAN on a
512x512 photo); glibc hands blocks that large back to the kernel on free, so each layer page-faults in (and the
kernel zeroes) new memory: 8 million page faults and 19-40 s of system time for the README's job on one thread,
~1 s once freed memory is kept.

Tests replace :func:`cpu_info` (``monkeypatch.setattr(realisr.cpu, "cpu_info", ...)``): every caller looks
it up through this module.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

__all__ = ["CPUInfo", "cpu_info", "default_threads", "physical_cores_available", "keep_freed_memory"]

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA), weakest first; both spellings of the AVX10 names.
_ONEDNN_ISAS = ["SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
                "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2"]
_FIRST_AMX = _ONEDNN_ISAS.index("AVX512_CORE_AMX")
_AVX10_NO_AMX = {"AVX10_2_512"}  # ranks above the AMX entries but has no tiles


@dataclass(frozen=True)
class CPUInfo:
    """The CPU as realisr sees it.

    Attributes:
        name: model name (``/proc/cpuinfo``) or what PyTorch reports.
        arch: ``x86_64``, ``aarch64``, ...
        amx_bf16: AMX tiles with bf16 (and oneDNN allowed to use them).
        avx512_bf16: AVX512-BF16 dot-product instructions.
        physical_cores: physical cores this process may run on (affinity and cgroup quota applied).
        logical_cores: logical CPUs this process may run on.
        source: where the flags came from (``"torch"`` or ``"/proc/cpuinfo"``, ``"none"``).
        isa_cap: ``ONEDNN_MAX_CPU_ISA`` when it is set (it can hide the AMX units from oneDNN).
        bf16_off: ``REALISR_CPU_BF16=0`` is set: realisr treats the AMX units as absent.
    """

    name: str
    arch: str
    amx_bf16: bool
    avx512_bf16: bool
    physical_cores: int
    logical_cores: int
    source: str = "torch"
    isa_cap: Optional[str] = None
    bf16_off: bool = False

    @property
    def bf16_units(self) -> bool:
        """bf16 matrix units that make bf16 faster than fp32 here (AMX-BF16; see the module docstring)."""
        return self.amx_bf16

    def units(self) -> str:
        """The bf16 units in words, e.g. ``"AMX-BF16, AVX512-BF16"`` or ``"none"``."""
        names = [n for n, ok in (("AMX-BF16", self.amx_bf16), ("AVX512-BF16", self.avx512_bf16)) if ok]
        return ", ".join(names) or "none"

    def describe(self) -> str:
        """One line for logs and benchmark tables."""
        cap = f"; ONEDNN_MAX_CPU_ISA={self.isa_cap}" if self.isa_cap else ""
        cap += "; REALISR_CPU_BF16=0" if self.bf16_off else ""
        return (f"{self.name} ({self.arch}), {self.physical_cores} physical / {self.logical_cores} logical cores "
                f"available, bf16 units: {self.units()}{cap} -> dtype auto: "
                f"{'bf16 where the model allows it' if self.bf16_units else 'fp32'}")


def _proc_cpuinfo() -> tuple[str, set]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "", set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not name:
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return name, flags


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> Optional[int]:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), rounded up; ``None``: no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        pass
    return None


def physical_cores_available(cpus=None, sysfs: Path = Path("/sys/devices/system/cpu"),
                             cgroup: Path = Path("/sys/fs/cgroup")) -> tuple[int, int]:
    """``(physical cores, logical CPUs)`` this process may run on.

    Cores are counted from the sysfs topology of the allowed CPUs (``(package, core)`` pairs, so
    hyper-thread siblings count once), then capped by a cgroup CPU quota.

    Args:
        cpus: the allowed logical CPU ids (default: the process's affinity).
        sysfs, cgroup: roots to read (tests point them at a fake tree).
    """
    if cpus is None:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = list(range(os.cpu_count() or 1))
    logical = max(1, len(cpus))
    cores = set()
    for c in cpus:
        topo = sysfs / f"cpu{c}" / "topology"
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores = set()
            break
    physical = len(cores) if cores else logical
    quota = _cgroup_cpu_limit(cgroup)
    if quota is not None:
        physical, logical = min(physical, quota), min(logical, quota)
    return max(1, physical), max(1, logical)


def _isa_cap() -> Optional[str]:
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        v = os.environ.get(var, "").strip().upper()
        if v:
            return v
    return None


def _amx_allowed(cap: Optional[str]) -> bool:
    if cap is None or cap in ("ALL", "DEFAULT") or cap not in _ONEDNN_ISAS:
        return True
    return _ONEDNN_ISAS.index(cap) >= _FIRST_AMX and cap not in _AVX10_NO_AMX


def _detect() -> CPUInfo:
    import platform

    name, flags = _proc_cpuinfo()
    caps: dict = {}
    try:
        import torch

        get = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
        caps = dict(get()) if get is not None else {}
    except Exception:  # noqa: BLE001 - detection must never break loading a model
        logger.debug("torch.cpu.get_capabilities() failed; using /proc/cpuinfo", exc_info=True)
    if caps:
        amx, avx = bool(caps.get("amx_bf16")), bool(caps.get("avx512_bf16"))
        name = name or str(caps.get("cpu_name", ""))
        source = "torch"
    else:
        amx, avx = "amx_bf16" in flags, "avx512_bf16" in flags
        source = "/proc/cpuinfo" if flags else "none"
    cap = _isa_cap()
    off = os.environ.get("REALISR_CPU_BF16", "").strip().lower() in ("0", "off", "false", "no")
    amx = amx and _amx_allowed(cap) and not off
    physical, logical = physical_cores_available()
    return CPUInfo(name=name or platform.processor() or "unknown CPU", arch=platform.machine() or "?",
                   amx_bf16=amx, avx512_bf16=avx, physical_cores=physical, logical_cores=logical, source=source,
                   isa_cap=cap, bf16_off=off)


@functools.lru_cache(maxsize=1)
def _cached() -> CPUInfo:
    info = _detect()
    logger.debug("CPU: %s (flags from %s)", info.describe(), info.source)
    return info


def cpu_info() -> CPUInfo:
    """The CPU's bf16 units and available cores (detected once per process)."""
    return _cached()


def default_threads() -> int:
    """Threads for CPU inference: ``OMP_NUM_THREADS`` when set, else the physical cores this process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return cpu_info().physical_cores


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (no ``mmap`` for large blocks, no trimming).

    For applications that run big CPU inference repeatedly (``realisr`` calls it at start); it changes how the
    whole process allocates, so the library never calls it. The peak memory is unchanged; freed memory is kept
    by the process until it exits instead of being returned to the kernel. Returns ``False`` (doing nothing)
    where the C library is not glibc.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    logger.debug("glibc malloc keeps freed memory: %s", ok)
    return ok
