"""Weights and KV caches of the fast CPU path in memory backed by transparent huge pages (2 MiB) where the OS
offers them.

Why: a decode step streams every weight once (0.2-1.4 GB for LFM2-350M), and with 4 KiB pages that is one
TLB miss and page walk per 4 KiB read; with 2 MiB pages the walks all but vanish. Measured on the 2-core
AMD EPYC box (docs/BENCHMARKS.md, "Fast CPU inference path"): the same matrix-vector kernels over LFM2-350M's
bf16 / fp32 projections ran 15-25% faster from huge pages. Most Linux systems ship transparent huge pages
as `madvise` (only regions that ask get them), and torch's allocator does not ask, so the fast path maps its
own anonymous memory and asks (MADV_HUGEPAGE) before the first write.

Nothing here changes a number: tensors are copied bit for bit. Where the OS has no MADV_HUGEPAGE (macOS,
Windows), for tensors under 2 MiB, or with `LFM2_HUGE_PAGES=0`, tensors stay ordinary torch tensors.
"""

from __future__ import annotations

import mmap
import os

import torch

HUGE_PAGE = 2 << 20
ENV_SWITCH = "LFM2_HUGE_PAGES"


def enabled() -> bool:
    """Whether this process maps large fast-path tensors with MADV_HUGEPAGE (`LFM2_HUGE_PAGES=0` turns it off)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled contiguous tensor, in huge-page-advised anonymous memory when it is at least 2 MiB.

    The mapping lives as long as the tensor (the tensor holds the buffer). Anonymous mappings start zeroed,
    so this is also `zeros`.
    """
    numel = 1
    for n in shape:
        numel *= int(n)
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    with torch.inference_mode(False):  # a normal tensor, writable in and out of inference mode
        if nbytes < HUGE_PAGE or not enabled():
            return torch.zeros(tuple(shape), dtype=dtype)
        try:
            buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            buf.madvise(mmap.MADV_HUGEPAGE)
        except (OSError, ValueError):  # e.g. a kernel built without THP: ordinary pages
            return torch.zeros(tuple(shape), dtype=dtype)
        return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(dtype).view(tuple(shape))


def copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` placed as `empty` places it (small tensors: a plain contiguous copy)."""
    out = empty(t.shape, t.dtype)
    with torch.inference_mode(False):
        out.copy_(t.detach())
    return out
