"""Process groups for torchrun (gloo on CPU, NCCL on GPU) and the CPU compatibility layer."""

from nemo_neo.parallel.state import ParallelConfig, ParallelContext, destroy, initialize

__all__ = ["ParallelConfig", "ParallelContext", "initialize", "destroy"]
