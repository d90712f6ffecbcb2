"""The ranks of a one-machine extraction on several processes: rank 0 (this process) starts ranks 1..n-1, each
`python -m imgret.embed.extract SPEC` with the extraction's settings and image set as JSON, and joins them."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from imgret.embed.options import ExtractSettings
from imgret.sources.base import ImageSet


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def local_ranks(settings: ExtractSettings, image_set: ImageSet, final_dir: Path, devices: int, forward=None):
    """Ranks 1..devices-1 of a one-machine extraction, each a process running only the extraction
    (`python -m imgret.embed.extract SPEC`), and this process as rank 0 among them.

    Lightning's own launcher would start the whole command again in every rank (a second MLflow run, a
    second sweep under `-m`); these ranks get the extraction's settings and the image set, nothing else."""
    spec = Path(tempfile.mkdtemp(prefix="imgret-ranks-")) / "spec.json"
    (spec.parent / "paths.txt").write_text("\n".join(image_set.paths))
    np.save(spec.parent / "labels.npy", image_set.labels)
    spec.write_text(json.dumps({"settings": settings.to_json(), "final_dir": str(final_dir), "dataset": image_set.dataset,
                                "split": image_set.split, "class_names": list(image_set.class_names),
                                "source_id": image_set.source_id,
                                # the backend's model as rank 0 converted (and, for int8, calibrated) it
                                "model_file": str(getattr(forward, "model_file", None) or "") or None}))
    shared = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(devices), "NODE_RANK": "0"}
    ranks = [subprocess.Popen([sys.executable, "-m", "imgret.embed.extract", str(spec)],
                              env={**os.environ, **shared, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in range(1, devices)]
    saved = {key: os.environ.get(key) for key in (*shared, "RANK", "LOCAL_RANK")}
    os.environ.update({**shared, "RANK": "0", "LOCAL_RANK": "0"})  # Lightning: the ranks exist, join them
    failed = True
    try:
        yield
        failed = False
    except BaseException:
        for rank in ranks:
            rank.kill()
        raise
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the next extraction starts ranks of its own
        codes = [rank.wait(timeout=600) for rank in ranks]
        shutil.rmtree(spec.parent, ignore_errors=True)
        if any(codes) and not failed:  # after a failure here, the ranks were killed: report that failure instead
            raise RuntimeError(f"extraction ranks 1..{devices - 1} exited with {codes}; see their output above")
