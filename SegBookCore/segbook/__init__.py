"""SegBook core: STU-Net segmentation and fine-tuning, headless. See DESIGN.md for the architecture."""
from .checkpoint import CheckpointError, load_checkpoint
from .config import Arch, ModelConfig, Plan
from .network import STUNet, build_stunet
from .zoo import REGISTRY, ModelNotFound, create_model, fetch, get_config

__version__ = "0.1.0"
__all__ = ["STUNet", "build_stunet", "load_checkpoint", "CheckpointError", "create_model", "fetch",
           "get_config", "REGISTRY", "ModelNotFound", "ModelConfig", "Arch", "Plan"]
