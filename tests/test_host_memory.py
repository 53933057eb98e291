"""slt_tools.sampling.host_memory: freed host memory is kept only where it applies, the settings nest and are
restored, and a run's numbers do not depend on it."""
import os
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import slt_tools as slt
from slt_tools.sampling import host_memory as H


def test_applies_only_to_the_cpu_and_without_a_callers_malloc_settings(monkeypatch):
    for key in [k for k in list(os.environ) if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("SLT_TOOLS_KEEP_MALLOC", raising=False)
    assert H.applies("cpu") == (H._glibc() is not None)
    assert not H.applies("meta") and not H.applies(torch.device("cuda", 0))
    for key, value in (("SLT_TOOLS_KEEP_MALLOC", "1"), ("MALLOC_ARENA_MAX_", "2"), ("GLIBC_TUNABLES", "x")):
        with monkeypatch.context() as m:
            m.setenv(key, value)
            assert not H.applies("cpu")
            with H.retained_host_memory("cpu") as kept:
                assert kept is False


def test_settings_nest_and_are_restored(monkeypatch):
    """The retained settings are made once on entering the outermost block, and glibc's warmed-up thresholds
    (with a trim) when it ends, also after an exception."""
    calls = []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(H, "_glibc", lambda: FakeLibc())
    monkeypatch.setattr(H, "applies", lambda device: True)
    with pytest.raises(RuntimeError):
        with H.retained_host_memory("cpu") as outer:
            with H.retained_host_memory("cpu") as inner:
                assert outer and inner and calls == list(H.RETAINED.items())
            assert calls == list(H.RETAINED.items())
            raise RuntimeError
    assert calls == list(H.RETAINED.items()) + list(H.AFTER.items()) + [("trim", 0)]
    assert H._depth == 0


def test_a_run_is_the_same_with_and_without_kept_memory(monkeypatch):
    """Per-chain losses of a seeded run are identical whether freed memory is kept or not."""
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(64)
    model = torch.nn.Linear(3, 1)
    loader = DataLoader(TensorDataset(x, y[:, None]), batch_size=16, shuffle=True)

    def loss_fn(m, batch):
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

    traces = []
    for keep in ("0", "1"):
        monkeypatch.setenv("SLT_TOOLS_KEEP_MALLOC", keep)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = slt.estimate_llc(model, loader, loss_fn, num_chains=2, num_draws=20, lr=1e-3, localization=10.0,
                                   nbeta=5.0, seed=0)
        traces.append(res.loss_trace)
    np.testing.assert_array_equal(traces[0], traces[1])
