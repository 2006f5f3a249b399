"""Model builders by architecture name (a plain dict, no registry magic)."""
from .deformable import build_deformable
from .detr import build_detr

BUILDERS = {"detr": build_detr, "deformable": build_deformable}


def build_model(model_cfg):
    """Build the detector named by ``model_cfg.arch``."""
    return BUILDERS[model_cfg.arch](model_cfg)
