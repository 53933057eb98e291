"""Minibatch streams for the sampler.

The user's ``DataLoader`` is read once; if every batch is a tensor (or a tuple/list/dict of tensors) and the data fit
the memory budget, the whole training set is cached on the sampling device and minibatches are drawn there by seeded
random permutations (one epoch after another, without replacement within an epoch). This removes the DataLoader's
per-step Python overhead and makes the batch sequence a function of the seed alone, so a chain's trajectory does not
depend on which other chains run beside it. Anything else falls back to cycling over the user's loader.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torch.utils.data._utils.collate import default_collate


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor leaf of a (possibly nested) batch to ``device``."""
    leaves, spec = tree_flatten(batch)
    return tree_unflatten([x.to(device) if isinstance(x, torch.Tensor) else x for x in leaves], spec)


def _in_order(loader: Any) -> Any:
    """The loader's data in dataset order (a shuffling DataLoader would make the cache depend on global RNG)."""
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        return DataLoader(loader.dataset, batch_size=loader.batch_size or 1, shuffle=False,
                          collate_fn=loader.collate_fn, num_workers=0)
    return loader


def _tensor_dataset_leaves(loader: Any) -> list[torch.Tensor] | None:
    """The tensors of a ``DataLoader`` over a ``TensorDataset`` with the default collate (whose batches are lists of
    the dataset's tensors, sliced) — read directly instead of batch by batch; None for anything else."""
    if not (isinstance(loader, DataLoader) and type(loader.dataset) is TensorDataset
            and loader.collate_fn is default_collate):
        return None
    tensors = list(loader.dataset.tensors)
    if not tensors or any(x.ndim == 0 for x in tensors):
        return None
    return tensors


def batch_size_of(batch: Any) -> int:
    """Leading dimension shared by the tensor leaves of a batch (ValueError if they disagree or there are none)."""
    sizes = {x.shape[0] for x in tree_flatten(batch)[0] if isinstance(x, torch.Tensor) and x.ndim > 0}
    if len(sizes) != 1:
        raise ValueError(f"cannot infer the batch size: tensor leaves have leading sizes {sorted(sizes)}")
    return sizes.pop()


def _check_not_ragged(batches: list[tuple[list[Any], Any]]) -> None:
    """Every batch's leaf i must have one shape after its leading (batch) axis: token batches of differing sequence
    lengths cannot be stacked into one data set (``ValueError`` saying how to fix it, not a ``torch.cat`` error)."""
    leaves, spec = batches[0]
    keys = [str(k) for k in spec.context] if spec.type is dict and len(spec.context) == len(leaves) else []
    for i in range(len(leaves)):
        shapes = sorted({tuple(b[0][i].shape[1:]) for b in batches})
        if len(shapes) > 1:
            which = repr(keys[i]) if keys else f"tensor {i}"
            raise ValueError(f"ragged batches: {which} has shapes {shapes} after the batch axis in different batches "
                             "(e.g. token sequences of differing lengths); pad every sequence to one length and pass "
                             "an attention_mask (1 = real token, 0 = padding)")
        dtypes = {b[0][i].dtype for b in batches}
        if len(dtypes) > 1:
            raise ValueError(f"batches disagree on the dtype of tensor {i}: {sorted(map(str, dtypes))}")


@dataclass
class BatchStream:
    """An endless, seeded stream of minibatches plus the facts the estimator needs about the data.

    ``num_samples`` is n, the number of training samples; ``batch_size`` is m; ``full_batches`` yields the whole
    data set in batches (for the full-data loss L_n(w*)).
    """

    num_samples: int
    batch_size: int
    cached: bool
    _leaves: list[torch.Tensor] | None
    _spec: Any
    _loader: Any
    _device: torch.device

    @classmethod
    def from_loader(cls, loader: Any, device: torch.device, max_cache_bytes: float = 2e9) -> BatchStream:
        direct = _tensor_dataset_leaves(loader)
        if direct is not None and sum(x.numel() * x.element_size() for x in direct) <= max_cache_bytes:
            n = direct[0].shape[0]
            if n == 0:
                raise ValueError("the data loader is empty: its TensorDataset has no samples")
            if any(x.shape[0] != n for x in direct):
                raise ValueError(f"TensorDataset tensors have differing leading sizes {[x.shape[0] for x in direct]}")
            m = int(min(loader.batch_size or 1, n))
            if loader.drop_last:  # as the loader does: the incomplete last batch is not part of the data
                n = (n // m) * m
                direct = [x[:n] for x in direct]
            return cls(n, m, True, [x.to(device) for x in direct], tree_flatten(list(direct))[1], loader, device)
        source = _in_order(loader)
        batches = []
        total_bytes = 0
        cacheable = True
        for batch in source:
            leaves, spec = tree_flatten(batch)
            if not all(isinstance(x, torch.Tensor) and x.ndim > 0 for x in leaves):
                cacheable = False
            total_bytes += sum(x.numel() * x.element_size() for x in leaves if isinstance(x, torch.Tensor))
            if total_bytes > max_cache_bytes:
                cacheable = False
            if not cacheable:
                break
            batches.append((leaves, spec))
        if cacheable and not batches:
            raise ValueError("the data loader is empty: it yielded no batches")
        if not cacheable:
            first = next(iter(loader), None)
            if first is None:
                raise ValueError("the data loader is empty: it yielded no batches")
            dataset = getattr(loader, "dataset", None)
            try:
                n = len(dataset)  # type: ignore[arg-type]
            except TypeError:
                n = sum(batch_size_of(b) for b in loader)
            m = getattr(loader, "batch_size", None) or batch_size_of(first)
            return cls(n, int(m), False, None, None, loader, device)
        specs = {str(s) for _, s in batches}
        if len(specs) != 1:
            raise ValueError("the data loader yields batches of differing structure")
        spec = batches[0][1]
        _check_not_ragged(batches)
        leaves = [torch.cat([b[0][i] for b in batches]).to(device) for i in range(len(batches[0][0]))]
        sizes = {x.shape[0] for x in leaves}
        if len(sizes) != 1:
            raise ValueError(f"batch tensors have differing leading sizes {sorted(sizes)}")
        n = sizes.pop()
        m = getattr(loader, "batch_size", None) or batch_size_of(tree_unflatten(batches[0][0], spec))
        return cls(n, int(min(m, n)), True, leaves, spec, loader, device)

    def _take(self, idx: torch.Tensor) -> Any:
        assert self._leaves is not None
        return tree_unflatten([x[idx] for x in self._leaves], self._spec)

    def stream(self, seed: int) -> Iterator[Any]:
        """Endless minibatches; with a cached data set the order is a function of ``seed`` alone."""
        if not self.cached:
            while True:
                for batch in self._loader:
                    yield to_device(batch, self._device)
        gen = torch.Generator().manual_seed(int(seed))
        n, m = self.num_samples, self.batch_size
        per_epoch = n // m
        chunk = 64  # batches gathered at once: one indexing call per leaf for 64 steps, the batches are views
        leaves = self._leaves
        assert leaves is not None
        while True:
            perm = torch.randperm(n, generator=gen).to(self._device)
            for start in range(0, per_epoch, chunk):
                stop = min(start + chunk, per_epoch)
                block = [x[perm[start * m : stop * m]] for x in leaves]
                for i in range(stop - start):
                    yield tree_unflatten([x[i * m : (i + 1) * m] for x in block], self._spec)

    def full_batches(self, batch_factor: int = 1) -> Iterator[tuple[Any, int]]:
        """The whole data set once, as (batch, size) pairs; a cached set in batches of ``batch_factor``·m samples
        (fewer forward passes for L_n(w*); memory grows with the factor, so keep it modest)."""
        if not self.cached:
            for batch in self._loader:
                yield to_device(batch, self._device), batch_size_of(batch)
            return
        n, m = self.num_samples, self.batch_size * max(1, int(batch_factor))
        for i in range(math.ceil(n / m)):
            idx = torch.arange(i * m, min((i + 1) * m, n), device=self._device)
            yield self._take(idx), int(idx.numel())
