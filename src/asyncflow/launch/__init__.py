"""Start-up: torch.distributed, placement of ranks into meshes, and their process groups."""

from asyncflow.launch.placement import Meshes, PlacementConfig, build_meshes, init_distributed

__all__ = ["Meshes", "PlacementConfig", "build_meshes", "init_distributed"]
