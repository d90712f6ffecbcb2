"""imgret: an experiment-tracked research harness for image retrieval."""
import logging
import warnings

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _model_name(short: str, own_arch: str, arch: str) -> str:
    """A model config's `name`: its short name for the architecture it was written for, and the architecture
    itself once `model.arch` changes it (so model=resnet18 model.arch=efficientnet_b0 is not called resnet18)."""
    return short if str(arch) == str(own_arch) else str(arch)


def _help(command: str = "imgret-run", primary: str = "config.yaml") -> str:
    from imgret.cli import help_text

    return help_text(command, primary)


def _at_level(levels, default, *, _root_):
    """A method's query knob in a study that sweeps `level` (experiments/ann_libraries.yaml): the method's own
    value at that level, from cheap to exhaustive; its usual default when no level is set."""
    level = _root_.get("level")
    if level is None:
        return default
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < len(levels):
        raise ValueError(f"level={level}: a whole number from 0 to {len(levels) - 1} (this method's levels: "
                         f"{list(levels)})")
    return levels[level]


def _quantised(default, *, _root_):
    """A method that only keeps codes (FAISS's SQ, binary): the run's top-level `quantisation` where it names codes,
    this method's own default where it is none (so that `method=sq` alone runs)."""
    chosen = _root_.get("quantisation")
    return default if chosen in (None, "none") else chosen


# Third-party noise that says nothing about the run: Lightning's deprecation of its own pytree helper, and faiss
# announcing which SIMD build it loaded.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
# "Skip logging GPU metrics" and "Started monitoring" on every run with system metrics on a CPU machine
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

# Registered on import, before any config is resolved: every entry point and test imports imgret first.
OmegaConf.register_new_resolver("imgret.model_name", _model_name, replace=True)
OmegaConf.register_new_resolver("imgret.help", _help, replace=True)
OmegaConf.register_new_resolver("imgret.level", _at_level, replace=True)
OmegaConf.register_new_resolver("imgret.quantised", _quantised, replace=True)
