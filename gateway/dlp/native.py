"""The DLP's C kernels (gateway/dlp/_kernels.c), or None where they were not compiled (no C compiler
at install): each caller then runs its numpy or Python path instead, slower, to the same answers."""

try:
    from gateway.dlp import _kernels as kernels
except ImportError:
    kernels = None
