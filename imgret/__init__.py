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


# Third-party noise that says nothing about the run: Lightning's deprecation of its own pytree helper, and faiss
# announcing which SIMD build it loaded.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
# "Skip logging GPU metrics" and "Started monitoring" on every run with system metrics on a CPU machine
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

# Registered on import, before any config is resolved: every entry point and test imports imgret first.
OmegaConf.register_new_resolver("imgret.model_name", _model_name, replace=True)
OmegaConf.register_new_resolver("imgret.help", _help, replace=True)
