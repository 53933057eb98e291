"""The compiled sampler step: an inductor backend tuned for batched chains, and a pinned call path.

``torch.compile`` costs little per step on a GPU-sized model but a lot on the small models SLT studies: on a
2k-parameter MLP with 8 chains, dynamo's frame evaluation and wrappers took ≈ 50 µs of a ≈ 250 µs step, and
inductor's Python wrapper (buffer allocations, size asserts, views) ≈ 40 µs more. Two remedies live here:

* :func:`inductor_backend` compiles CPU graphs with inductor's C++ wrapper, rewrites two patterns that batched chains
  produce (:func:`rewrite_graph`: narrow-output batched matmuls, cross-entropy's one-hot gradient), and records which
  compiled graph ran last with which inputs;
* :class:`PinnedStep` calls that graph directly for the rest of a sampling loop whose inputs keep one structure and
  shape (cached data): step t's tensors take the places step 0's tensors had among the graph's inputs. It pins only a
  step that ran as exactly one graph whose every input and output it can place; otherwise the loop stays on the
  ordinary ``torch.compile`` path.

Like ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` (which the engine enters too), a pinned step assumes
that nothing outside its inputs changes during the loop; Python side effects of the model or loss (an attribute
written in ``forward``) happen at the first step only.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import nullcontext
from functools import cache
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

try:  # private torch API: without it the one-hot rewrite builds its nodes outside fake mode (still exact)
    from torch._guards import detect_fake_mode
except ImportError:  # pragma: no cover - older torch
    def detect_fake_mode(inputs: Any = None) -> None:
        return None


class _LastGraphCall(threading.local):
    """Per thread: how many compiled graphs ran since :meth:`reset`, and the last one with its flat inputs/outputs."""

    def __init__(self) -> None:
        self.calls = 0
        self.last: tuple[Callable[..., Any], tuple[Any, ...], Any] | None = None

    def reset(self) -> None:
        self.calls, self.last = 0, None

    def take(self) -> tuple[int, tuple[Callable[..., Any], tuple[Any, ...], Any] | None]:
        out = (self.calls, self.last)
        self.reset()
        return out


GRAPH_CALLS = _LastGraphCall()


_aten = torch.ops.aten


def _transposed(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    out = graph.call_function(_aten.permute.default, (node, [0, 2, 1]))
    out.meta["val"] = node.meta["val"].permute(0, 2, 1)
    return out


def _narrow_bmm_first(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    """A·B with output (b, M, N), N < 16, M ≥ 4N  ↦  (Bᵀ·Aᵀ)ᵀ."""
    val = node.meta.get("val")
    if val is None or not all(isinstance(n, int) for n in val.shape):
        return False
    _, rows, cols = val.shape
    if not (cols < 16 and rows >= 4 * cols):
        return False
    a, b = node.args
    with graph.inserting_before(node):
        bt, at = _transposed(graph, b), _transposed(graph, a)
        prod = graph.call_function(_aten.bmm.default, (bt, at))
        prod.meta["val"] = torch.bmm(bt.meta["val"], at.meta["val"])
        node.replace_all_uses_with(_transposed(graph, prod))
    graph.erase_node(node)
    return True


def _one_hot_scatter_add(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    """scatter_add(full(c), d, index, src) with index and src of the output's shape but size 1 along d
    ↦  where(index == arange along d, src + c, c)."""
    base, dim, index, src = node.args
    if not (isinstance(base, torch.fx.Node) and base.target is _aten.full.default and isinstance(index, torch.fx.Node)
            and isinstance(src, torch.fx.Node)):
        return False
    out, idx, val, fill = node.meta.get("val"), index.meta.get("val"), src.meta.get("val"), base.args[1]
    if out is None or idx is None or val is None or not isinstance(fill, (int, float)):
        return False
    dim = dim % out.dim()
    expected = [1 if d == dim else n for d, n in enumerate(out.shape)]
    if (list(idx.shape) != expected or list(val.shape) != expected or val.dtype != out.dtype
            or not all(isinstance(n, int) for n in out.shape)):
        return False
    positions = [1] * out.dim()
    positions[dim] = out.shape[dim]
    with graph.inserting_before(node), detect_fake_mode([out]) or nullcontext():
        iota = graph.call_function(torch.ops.prims.iota.default, (out.shape[dim],),
                                   {"start": 0, "step": 1, "dtype": idx.dtype, "device": out.device,
                                    "requires_grad": False})
        iota.meta["val"] = torch.arange(out.shape[dim], dtype=idx.dtype, device=out.device)
        grid = graph.call_function(_aten.view.default, (iota, positions))
        grid.meta["val"] = iota.meta["val"].view(positions)
        hit = graph.call_function(_aten.eq.Tensor, (index, grid))
        hit.meta["val"] = torch.eq(idx, grid.meta["val"])
        value = src
        if fill != 0:
            value = graph.call_function(_aten.add.Tensor, (src, fill))
            value.meta["val"] = val + fill
        rest = graph.call_function(_aten.full.default, ([], fill),
                                   {"dtype": out.dtype, "device": out.device, "pin_memory": False})
        rest.meta["val"] = torch.full([], fill, dtype=out.dtype, device=out.device)
        onehot = graph.call_function(_aten.where.self, (hit, value, rest))
        onehot.meta["val"] = torch.where(hit.meta["val"], value.meta["val"], rest.meta["val"])
        node.replace_all_uses_with(onehot)
    graph.erase_node(node)
    if not base.users:
        graph.erase_node(base)
    return True


_REWRITES = {_aten.bmm.default: _narrow_bmm_first, _aten.scatter_add.default: _one_hot_scatter_add}


def rewrite_graph(graph: torch.fx.Graph) -> dict[str, int]:
    """The post-grad graph pass of :func:`inductor_backend`, in place; returns how often each rewrite applied.

    * ``narrow_bmm_first``: a batched matmul whose output has few columns, A·B with out (b, M, N), N < 16, M ≥ 4N,
      becomes (Bᵀ·Aᵀ)ᵀ. MKL's batched GEMM is 2.3–2.5× slower on the narrow-output form (the last layer of a network
      and its weight gradient: (8,100,64)·(8,64,10) for the benchmark MLP); the transposes are free views.
    * ``one_hot_scatter_add``: the gradient of cross-entropy under ``vmap`` scatters −1/N into a zero tensor the size
      of the logits (C × tokens × vocabulary: 32 MiB for the benchmark transformer), which inductor writes to memory
      and reads back. With one index per row, the scatter is a one-hot mask, ``where(index == arange, src, 0)``, that
      fuses into the softmax backward's kernel. Exact: every output element receives at most one addend.
    """
    counts: dict[str, int] = {}
    for node in list(graph.nodes):
        rewrite = _REWRITES.get(node.target) if node.op == "call_function" else None
        if rewrite is not None and rewrite(graph, node):
            name = rewrite.__name__.lstrip("_")
            counts[name] = counts.get(name, 0) + 1
    return counts


class _RewriteRecord(threading.local):
    """Per thread: graphs compiled by :func:`inductor_backend`, and how many of them ran :func:`rewrite_graph`
    (or were served from inductor's FX-graph cache, which skips post-grad passes legitimately)."""

    def __init__(self) -> None:
        self.compiles = 0
        self.passes_ran = 0

    def snapshot(self) -> tuple[int, int]:
        return self.compiles, self.passes_ran


REWRITES = _RewriteRecord()


def _cache_hits() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - very old torch
        return 0
    return int(counters["inductor"].get("fxgraph_cache_hit", 0))


@cache
def inductor_backend() -> Any:
    """Inductor with :func:`rewrite_graph` as an extra post-grad pass and, on CPU, the C++ wrapper; created once (a
    new backend object per call would recompile). Returns the string ``"inductor"`` (plain inductor) where the
    custom-pass interface is missing (older torch); :func:`rewrites_status` reports either case.

    The C++ wrapper replaces the per-call Python that allocates buffers and checks input sizes (8–12 % of a small MLP
    step). Every compile is recorded in :data:`REWRITES`, with whether the rewrite pass actually ran, so a torch
    version that stops calling it is noticed at run time rather than silently losing the speed.
    """
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
    except ImportError:
        return "inductor"

    class Rewrites(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            REWRITES.passes_ran += 1
            rewrite_graph(graph)

        def uuid(self) -> Any:
            return get_hash_for_files((__file__,))

    patches = {"post_grad_custom_post_pass": Rewrites()}
    has_cpp_wrapper = hasattr(inductor_config, "cpp_wrapper")

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        on_cpu = all(t.device.type == "cpu" for t in example_inputs if isinstance(t, torch.Tensor))
        cpp = {"cpp_wrapper": True} if on_cpu and has_cpp_wrapper else {}
        passes, hits = REWRITES.passes_ran, _cache_hits()
        compiled = compile_fx(gm, example_inputs, config_patches={**patches, **cpp})
        REWRITES.compiles += 1
        if REWRITES.passes_ran == passes and _cache_hits() > hits:
            REWRITES.passes_ran += 1  # served from the cache, which only holds graphs compiled with the pass

        def run(*args: Any) -> Any:
            out = compiled(*args)
            GRAPH_CALLS.calls += 1
            GRAPH_CALLS.last = (compiled, args, out)
            return out

        return run

    return backend


def rewrite_snapshot() -> tuple[int, int]:
    """(graphs compiled, graphs that ran the rewrite pass) so far in this thread."""
    return REWRITES.snapshot()


def rewrites_status(before: tuple[int, int]) -> str | None:
    """None if every graph compiled since ``before`` (a :meth:`_RewriteRecord.snapshot`) ran the rewrite pass;
    otherwise why not (the step is still correct, only slower)."""
    if inductor_backend() == "inductor":
        return f"torch {torch.__version__} lacks inductor's custom post-grad pass interface"
    compiles, ran = REWRITES.compiles - before[0], REWRITES.passes_ran - before[1]
    if compiles and ran < compiles:
        return (f"inductor compiled {compiles} graph(s) but ran slt_tools' rewrite pass on {ran} "
                f"(torch {torch.__version__} no longer calls post_grad_custom_post_pass)")
    return None


def allow_recompiles(limit: int = 64) -> None:
    """Raise dynamo's per-function cache limit to at least ``limit`` graphs.

    Steps compile static graphs (``dynamic=False``): dynamic-shape graphs ran the small-MLP step 2–3× slower and take
    shape arguments that a :class:`PinnedStep` cannot place. Static graphs need one cache entry per model class,
    sampler rule, chain count and batch shape, all on the one fused-step function; past dynamo's default of 8 entries
    later runs would silently go eager.
    """
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name, limit) < limit:
        setattr(cfg, name, limit)


def _identical(leaves: list[Any], x: Any) -> list[int]:
    return [i for i, leaf in enumerate(leaves) if leaf is x]


class PinnedStep:
    """A compiled step called without ``torch.compile``'s frame machinery: the graph that ran a recorded step, with
    that step's inputs (θ, w*, batch, noise, state, hyperparameters) replaced by the current ones.

    Build with :meth:`build` from one step's inputs, outputs and :data:`GRAPH_CALLS` record; it refuses (returns the
    reason) when the step ran as several graphs (graph breaks), when a graph input is not a tensor (dynamic shapes) or
    cannot be placed unambiguously among the step's inputs, or when an output is neither a graph output nor an input.
    Graph inputs that are none of the step's inputs (frozen parameters and buffers captured by the model) are the same
    tensors at every step and are passed as they were.
    """

    def __init__(self, graph: Callable[..., Any], template: list[Any], sources: list[tuple[int, int]],
                 outs: list[tuple[bool, int]], batch_spec: Any, state_keys: list[str], hp_keys: list[str],
                 out_state_keys: list[str]) -> None:
        self.graph, self.template, self.sources, self.outs = graph, template, sources, outs
        self.batch_spec, self.state_keys, self.hp_keys = batch_spec, state_keys, hp_keys
        self.out_state_keys = out_state_keys
        self._key_sets = (set(state_keys), set(hp_keys))  # checked at every step: built once

    @staticmethod
    def _leaves(theta: torch.Tensor, theta0: torch.Tensor, batch: Any, noise: Any, state: dict[str, torch.Tensor],
                hp: dict[str, torch.Tensor], state_keys: list[str], hp_keys: list[str]) -> tuple[list[Any], Any]:
        if type(batch) in (tuple, list) and all(type(b) is torch.Tensor for b in batch):
            batch_leaves, spec = batch, (type(batch), len(batch))  # the usual (x, y): no pytree walk
        else:
            batch_leaves, spec = tree_flatten(batch)
        noise_leaves = noise if isinstance(noise, tuple) else (noise,)
        return ([theta, theta0, *noise_leaves, *(state[k] for k in state_keys), *(hp[k] for k in hp_keys),
                 *batch_leaves], spec)

    @classmethod
    def build(cls, inputs: tuple[Any, ...], outputs: tuple[Any, ...],
              record: tuple[int, tuple[Callable[..., Any], tuple[Any, ...], Any] | None]) -> PinnedStep | str:
        calls, last = record
        if calls != 1 or last is None:
            return f"the step ran as {calls} compiled graphs (graph breaks), not one"
        graph, flat_in, flat_out = last
        theta, theta0, batch, noise, state, hp = inputs
        state_keys, hp_keys = list(state), list(hp)
        leaves, spec = cls._leaves(theta, theta0, batch, noise, state, hp, state_keys, hp_keys)
        storages = {leaf.untyped_storage().data_ptr() for leaf in leaves if isinstance(leaf, torch.Tensor)}
        template, sources = list(flat_in), []
        for pos, arg in enumerate(flat_in):
            if not isinstance(arg, torch.Tensor):
                return f"graph input {pos} is a {type(arg).__name__}, not a tensor (dynamic shapes)"
            found = _identical(leaves, arg)
            if len(found) > 1:
                return f"graph input {pos} is passed as {len(found)} of the step's inputs at once"
            if found:
                sources.append((pos, found[0]))
            elif arg.untyped_storage().data_ptr() in storages:
                return f"graph input {pos} shares memory with an input of the step without being one"
        losses, grads, new_theta, new_state = outputs
        outs = []
        for value in (losses, grads, new_theta, *new_state.values()):
            in_graph = _identical(list(flat_out), value)
            in_inputs = _identical(leaves, value)
            if in_graph:
                outs.append((True, in_graph[0]))
            elif len(in_inputs) == 1:
                outs.append((False, in_inputs[0]))
            else:
                return "an output of the step is neither an output of its graph nor one of its inputs"
        return cls(graph, template, sources, outs, spec, state_keys, hp_keys, list(new_state))

    def __call__(self, theta: torch.Tensor, theta0: torch.Tensor, batch: Any, noise: Any,
                 state: dict[str, torch.Tensor], hp: dict[str, torch.Tensor]) -> tuple[Any, ...] | None:
        """The step's (losses, grads, θ′, state′), or None if these inputs are not shaped like the pinned ones."""
        if state.keys() != self._key_sets[0] or hp.keys() != self._key_sets[1]:
            return None
        leaves, spec = self._leaves(theta, theta0, batch, noise, state, hp, self.state_keys, self.hp_keys)
        if spec != self.batch_spec:
            return None
        args = self.template.copy()
        for pos, i in self.sources:
            args[pos] = leaves[i]
        flat = self.graph(*args)
        values = [flat[i] if from_graph else leaves[i] for from_graph, i in self.outs]
        return values[0], values[1], values[2], dict(zip(self.out_state_keys, values[3:]))
