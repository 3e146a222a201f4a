"""Host memory for the KV cache: zero pages from the OS, made resident up front where that pays.

An anonymous mapping gives a 4 GiB cache without a multi-second memset at start-up and without
resident memory until it is used -- right for offline runs that use a fraction of it. But the
first write to each page then faults inside a forward pass (on the AMX VM: write_kv 13.5% of a
served rate-inf W3 run; a W3 replay 668 out tok/s with lazy pages vs 728 with the cache resident
first, 655 when a thread faulted pages in just ahead of the block pool, because the faults are
CPU work either way). A server, which runs for hours, pays it once at start-up instead:
`prefault` (cache_config.kv_prefault; on by default in `spruce serve`, as vLLM zeroes its cache
before it serves).
"""
from __future__ import annotations

import ctypes
import math
import mmap
import threading
from typing import Sequence

import torch

_HUGE_PAGE = 2 << 20
_PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = 23   # Linux >= 5.14; older kernels answer EINVAL
_CHUNK = 64 << 20            # a multiple of the huge page


def zeros(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """On CPU, an anonymous mapping marked for transparent huge pages where the kernel offers them
    on request: decode attention reads each request's blocks scattered over the cache, and with
    4 KiB pages the TLB misses cost 10-13% of the decode attention op (SmolLM2, 32 requests x
    220 tokens, Zen 4 dev box). Elsewhere plain torch.zeros."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:   # THP compiled out or disabled: plain pages
            pass
    # The tensor holds a reference to the mapping, which lives as long as the tensor does.
    return torch.frombuffer(buf, dtype=dtype, count=math.prod(shape)).view(shape)


def prefault(caches: Sequence[torch.Tensor], num_threads: int = 1) -> bool:
    """Make every CPU tensor of `caches` resident now (pages allocated, content unchanged), split
    over `num_threads` threads: faulting is CPU work in the kernel and scales with cores. False
    where the kernel lacks MADV_POPULATE_WRITE (pages then fault in on first write)."""
    spans = [(t.data_ptr(), t.numel() * t.element_size()) for t in caches if t.device.type == "cpu" and t.numel()]
    if not spans:
        return True
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise   # CDLL calls release the GIL
    except (OSError, AttributeError):
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    chunks = [(addr - addr % _PAGE + off, min(_CHUNK, nbytes + addr % _PAGE - off))
              for addr, nbytes in spans for off in range(0, nbytes + addr % _PAGE, _CHUNK)]
    failed, num_threads = [], max(1, num_threads)

    def work(k: int) -> None:
        for start, length in chunks[k::num_threads]:
            if failed or madvise(start, length, _MADV_POPULATE_WRITE) != 0:
                failed.append(True)
                return

    threads = [threading.Thread(target=work, args=(k,), name=f"spruce-kv-prefault-{k}")
               for k in range(num_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return not failed
