"""What extraction can be asked for, light to import: the precisions, the decoders, and the check of the extract
group (validate.py asks it before any work)."""
from __future__ import annotations

from imgret.errors import bad_value, check_bool, check_whole, whole

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")
DECODERS = ("torchvision", "pil")  # imgret/embed/preprocess.py
DEFAULT_DECODER = DECODERS[0]


def check_extract(extract, device: str) -> None:
    """The keys of the extract group (a run's `extract`), on this `device`."""
    check_whole("extract.latency_images", extract.latency_images, 1, " of images timed at batch 1")
    for key in ("channels_last", "progress"):
        check_bool(f"extract.{key}", extract.get(key, True))
    devices = extract.get("devices", 1)
    if devices != "auto" and not whole(devices, 1):
        raise bad_value("extract.devices", devices, "a whole number of processes or GPUs >= 1, or auto")
    check_whole("extract.num_nodes", extract.get("num_nodes", 1), 1, " of machines")
    if extract.get("precision", "auto") not in PRECISIONS:
        raise bad_value("extract.precision", extract.get("precision"), f"one of {', '.join(PRECISIONS)}")
    if extract.get("precision") == "16-mixed" and device != "cuda":
        raise bad_value("extract.precision", "16-mixed", "a precision this device runs: 16-mixed needs device=cuda; "
                        "on the CPU use bf16-mixed or 32-true")
    if extract.get("decoder", DECODERS[0]) not in DECODERS:
        raise bad_value("extract.decoder", extract.get("decoder"), f"one of {', '.join(DECODERS)}")
    strategy = extract.get("strategy", "auto")
    if strategy not in ("auto", "ddp"):
        from pytorch_lightning.strategies import StrategyRegistry

        if strategy not in StrategyRegistry.available_strategies():
            raise bad_value("extract.strategy", strategy, "auto, ddp, or another of Lightning's registered strategies")
