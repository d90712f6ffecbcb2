"""Which process this is when a launcher (torchrun, Slurm's srun) starts imgret several times: light to import,
for the entry point's first decision and the extraction's ranks alike."""
from __future__ import annotations

import os


def process_rank() -> int:
    """This process's global rank when a launcher (torchrun, Slurm's srun) started several, each running the
    whole command; 0 otherwise. Rank 0 runs and tracks the experiment; the others only extract with it."""
    for variable in ("RANK", "SLURM_PROCID"):
        if variable in os.environ and launched_externally():
            return int(os.environ[variable])
    return 0


def launched_externally() -> bool:
    """Several processes were started by a launcher (torchrun sets WORLD_SIZE; srun sets SLURM_NTASKS)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1
