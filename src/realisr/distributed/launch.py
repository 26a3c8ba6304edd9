"""The processes of ``torchrun`` / ``accelerate launch``: who am I, which device is mine, wait for the others.

Both launchers start ``N`` copies of ``python -m realisr upscale ...`` with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` set. :class:`ProcessGroup` reads them, opens a gloo
process group (on CPUs and GPUs alike: only barriers travel, the images never leave their process) and gives
each process its device: ``cuda:LOCAL_RANK`` when CUDA is there, one model per GPU. Without those variables it
is a group of one and every call is free.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

logger = logging.getLogger(__name__)

__all__ = ["ProcessGroup"]

#: How long a barrier waits for the slowest process (a share of a large job can take hours):
#: ``REALISR_DIST_TIMEOUT_H`` hours, default 72.
DEFAULT_TIMEOUT_H = 72.0


@dataclass
class ProcessGroup:
    """This process's place among the launcher's processes.

    Attributes:
        rank: this process (0 .. size-1); rank 0 reports progress and the summary.
        size: number of processes (``WORLD_SIZE``).
        local_rank: index on this machine (``LOCAL_RANK``): the GPU it takes.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    _own: bool = False

    @classmethod
    def from_env(cls) -> "ProcessGroup":
        """From ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (torchrun, accelerate launch); a group of one
        without them."""
        def num(name: str, default: int) -> int:
            try:
                return int(os.environ.get(name, default))
            except ValueError:
                return default

        size = max(1, num("WORLD_SIZE", 1))
        rank = num("RANK", 0) if size > 1 else 0
        return cls(rank=rank, size=size, local_rank=num("LOCAL_RANK", rank) if size > 1 else 0)

    @property
    def worker_name(self) -> str:
        """``main`` alone, ``rank<i>`` among several (the journal file of this process)."""
        return "main" if self.size == 1 else f"rank{self.rank}"

    @property
    def initialized(self) -> bool:
        if self.size == 1:
            return True
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()

    def init(self) -> None:
        """Open the gloo process group (once; a group opened by the caller, e.g. accelerate's, is used as is)."""
        if self.initialized:
            return
        import torch.distributed as dist

        hours = float(os.environ.get("REALISR_DIST_TIMEOUT_H", DEFAULT_TIMEOUT_H))
        dist.init_process_group("gloo", rank=self.rank, world_size=self.size, timeout=timedelta(hours=hours))
        self._own = True
        logger.info("process %d of %d (local %d)", self.rank, self.size, self.local_rank)

    def barrier(self) -> None:
        """Wait until every process is here."""
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def device_for(self, device: Optional[str]) -> Optional[str]:
        """This process's device: with CUDA and ``device`` unset / ``auto`` / ``cuda``, ``cuda:LOCAL_RANK``
        (one model per GPU); otherwise ``device`` as given."""
        if self.size == 1 or device not in (None, "auto", "cuda"):
            return device
        import torch

        if torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return device

    def close(self) -> None:
        """Close the process group if this object opened it."""
        if self._own:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._own = False
