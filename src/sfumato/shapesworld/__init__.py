"""ShapesWorld v1: the procedural image-caption data set (see SHAPESWORLD.md)."""

from . import spec
from .dataset import ShapesWorld, write_dataset
from .render import Obj, Scene, make_scene, render, sample_scene

__all__ = ["spec", "ShapesWorld", "write_dataset", "Obj", "Scene", "make_scene", "render", "sample_scene"]
