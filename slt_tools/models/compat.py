"""Making PyTorch's own attention kernels usable under ``torch.func.vmap`` and autograd.

``nn.MultiheadAttention`` in eval mode takes a fused fast path (``aten::_native_multi_head_attention``) that has no
derivative, so a vmapped gradient through it fails; and ``F.scaled_dot_product_attention`` (used by
``nn.MultiheadAttention(need_weights=False)`` and by Hugging Face models' ``"sdpa"`` attention) picks fused kernels
with no batching rule, so ``vmap`` loops over the batch one sample at a time and warns on every call. Inside
:func:`vmappable_attention` both take their plain compositional paths: the fast path is off and SDPA runs its math
backend, which is built of ordinary batched ops.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextmanager
def vmappable_attention() -> Iterator[None]:
    """Within the block: no ``nn.MultiheadAttention`` fast path, and SDPA on its math backend (both restored after).

    Numerically the same attention (float rounding aside); use it around vmapped forward/backward passes.
    """
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
