"""Kernel space and samplers for building device latency tables."""
from .sampling import DEFAULT_KIND_WEIGHTS, DEFAULT_MAX_MACS, SHAPE_PRIOR, propose_adaptive, sample_kernels
from .space import KERNEL_KINDS, Kernel, KindSpec, Site, kind_spec, register_kind

__all__ = [
    "DEFAULT_KIND_WEIGHTS", "DEFAULT_MAX_MACS", "KERNEL_KINDS", "SHAPE_PRIOR", "Kernel", "KindSpec", "Site",
    "kind_spec", "propose_adaptive", "register_kind", "sample_kernels",
]
