"""The DLP's C kernels (gateway/dlp/_kernels.c), or None where they were not compiled (no C compiler
at install) or GATEWAY_DLP_KERNELS=off says not to use them (to compare, see bench/dlp.py): each caller
then runs its numpy or Python path instead, slower, to the same answers."""

import os

try:
    from gateway.dlp import _kernels as kernels
except ImportError:
    kernels = None
if os.environ.get("GATEWAY_DLP_KERNELS", "").lower() in ("off", "0", "no"):
    kernels = None
