"""Model builders by architecture name (a plain dict, no registry magic).

Each architecture's module is imported when it is built, so a stage's code is only its own
architecture's (effdetr.codedeps: editing Deformable DETR reruns no DETR experiment)."""
from importlib import import_module

BUILDERS = {"detr": ("effdetr.models.detr", "build_detr"), "deformable": ("effdetr.models.deformable",
                                                                          "build_deformable")}


def build_model(model_cfg):
    """Build the detector named by ``model_cfg.arch``."""
    module, name = BUILDERS[model_cfg.arch]
    return getattr(import_module(module), name)(model_cfg)
