"""The shape of the sampling core: one config, typed results, a rule registry, no import cycles, checked fast paths,
and the bugs the old shape caused (each pinned by a test)."""
import ast
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import dln_at, mse, teacher_loader

import slt_tools as slt
from slt_tools.sampling import calibration as calibration_module
from slt_tools.sampling.config import LLCConfig, LocalizationWarning
from slt_tools.sampling.result import (
    LLCDiagnostics,
    LLCResult,
    LLCWarning,
    NotStationaryWarning,
    SamplingFallbackWarning,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_problem():
    model = dln_at((4, 3, 4), 1, (1,))
    return model, teacher_loader(model, 2000, 100, 4)


def _quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return slt.estimate_llc(*args, **kwargs)


# ---------------------------------------------------------------- package shape
def test_submodules_are_attributes_in_a_fresh_interpreter():
    code = ("import slt_tools as slt; import sys; assert 'slt_tools.theory' not in sys.modules; "
            "print(slt.theory.dln_learning_coefficient((5, 3, 5), 0)[0], slt.symmetry.__name__, "
            "slt.geometry.__name__, slt.models.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["13/2", "slt_tools.symmetry", "slt_tools.geometry", "slt_tools.models"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        slt.nope  # noqa: B018


def _module_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module → the modules of the same tree it imports (``from a.b import c`` counts a.b and, if a module, a.b.c);
    package ``__init__`` files are left out (they only re-export)."""
    def name(p: Path) -> str:
        return ".".join(p.relative_to(ROOT).with_suffix("").parts)

    files = {name(p): p for p in package_dir.rglob("*.py") if p.name != "__init__.py"}
    graph = {}
    for m, p in files.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[m] = {d for d in deps if d in files and d != m}
    return graph


def _assert_acyclic(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, f"import cycle: {' -> '.join([*stack, m, d])}"
            if d not in state:
                visit(d, [*stack, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_sampling_package_has_no_import_cycle():
    """Every import between the sampling modules, including function-level ones, points down the layer order."""
    graph = _module_graph(ROOT / "slt_tools" / "sampling")
    _assert_acyclic(graph)
    assert "slt_tools.sampling.auto" not in graph["slt_tools.sampling.calibration"]
    assert "slt_tools.sampling.auto" not in graph["slt_tools.sampling.estimate"]


def test_whole_package_has_no_import_cycle_and_no_private_imports():
    """No cycle between any two modules of slt_tools (function-level imports included), and no module imports
    another module's private (underscore) name — what one module needs from another is public there."""
    _assert_acyclic(_module_graph(ROOT / "slt_tools"))
    private = []
    for p in (ROOT / "slt_tools").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slt_tools"):
                private += [f"{p.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, private


# ---------------------------------------------------------------- config
def test_config_is_frozen_validated_and_round_trips():
    cfg = LLCConfig(num_chains=3, lr=1e-4, localization=10.0, sampler="rmsprop_sgld",
                    sampler_kwargs={"alpha": 0.9}, restrict_to=["layers.0.weight"])
    with pytest.raises(AttributeError):
        cfg.lr = 1.0
    assert LLCConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(lr=2e-4).lr == 2e-4 and cfg.lr == 1e-4
    bad = [dict(mala_every=-1), dict(explode_threshold=-1.0), dict(chain_chunk_size=0), dict(chain_chunk_size=-1),
           dict(num_draws=10.5), dict(seed=1.5), dict(num_chains=True), dict(lr=float("nan")),
           dict(sampler_kwargs={"alpah": 0.9}, sampler="rmsprop_sgld"), dict(sampler="hmc"),
           dict(localization=-1.0), dict(on_divergence="ignore")]
    for kw in bad:
        with pytest.raises(ValueError):
            LLCConfig(**kw)
    with pytest.raises(TypeError, match="unknown LLC setting"):
        LLCConfig.from_kwargs(num_chain=3)


def test_estimate_llc_accepts_a_config_and_keywords_alike(small_problem):
    model, loader = small_problem
    kw = dict(num_chains=2, num_draws=30, lr=1e-4, localization=10.0, seed=3)
    a = _quiet(model, loader, mse, **kw)
    b = _quiet(model, loader, mse, LLCConfig(**kw))
    c = slt.sample_llc(model, loader, mse, LLCConfig(**kw))
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    np.testing.assert_array_equal(a.loss_trace, c.loss_trace)
    with pytest.raises(ValueError, match="needs lr and localization"):
        slt.sample_llc(model, loader, mse, LLCConfig(num_chains=2))


# ---------------------------------------------------------------- typed results and warnings
def test_diagnostics_are_typed_and_read_like_the_old_dicts(small_problem):
    model, loader = small_problem
    res = _quiet(model, loader, mse, num_chains=2, num_draws=40, lr=1e-4, localization=10.0)
    d = res.diagnostics
    assert isinstance(d, LLCDiagnostics)
    assert d.stationary is d["stationary"] and d.per_chain.diverged == d["per_chain"]["diverged"]
    assert "calibration" not in d and d.get("converged") is None and d.get("converged", "x") == "x"
    back = LLCResult.from_json(res.to_json())
    assert back.diagnostics.to_dict() == d.to_dict()
    stored = {**d.to_dict(), "written_by_a_later_version": 1}
    assert LLCDiagnostics.from_dict(stored).to_dict()["written_by_a_later_version"] == 1


def test_warnings_are_classes():
    assert issubclass(NotStationaryWarning, LLCWarning) and issubclass(LLCWarning, RuntimeWarning)
    drifting = np.tile(0.01 + 0.05 * np.linspace(0, 1, 400), (3, 1))
    drifting += 1e-4 * np.random.default_rng(1).standard_normal((3, 400))
    from slt_tools.sampling.result import summarize

    with pytest.warns(NotStationaryWarning):
        summarize(drifting, 0.0, dict(nbeta=100.0, explode_threshold=100.0, lr=1e-3), [0, 1, 2])


# ---------------------------------------------------------------- bugs of the old shape
def test_sampler_kwargs_reach_the_calibration_pilots(small_problem, monkeypatch):
    """They used to stop at estimate_llc: RMSProp pilots calibrated with the default alpha."""
    model, loader = small_problem
    seen = []
    real = calibration_module.sample

    def spy(problem, config, **kw):
        seen.append((config.sampler, dict(config.sampler_kwargs)))
        return real(problem, config, **kw)

    monkeypatch.setattr(calibration_module, "sample", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slt.calibrate_llc(model, loader, mse, localization=10.0, num_chains=2, num_draws=50, sampler="rmsprop_sgld",
                          sampler_kwargs={"alpha": 0.9, "eps": 0.05}, pilot_steps=50, max_lr=1e-3)
    assert seen and all(s == ("rmsprop_sgld", {"alpha": 0.9, "eps": 0.05}) for s in seen)


def test_checks_requested_for_a_hand_set_run_are_run(small_problem):
    """max_extensions / convergence_probe used to be ignored when lr and localization were both given."""
    model, loader = small_problem
    kw = dict(num_chains=2, num_draws=40, lr=1e-4, localization=10.0)
    plain = _quiet(model, loader, mse, **kw)
    assert "overdispersed_probe" not in plain.diagnostics and "converged" not in plain.diagnostics
    checked = _quiet(model, loader, mse, convergence_probe=True, max_extensions=1, **kw)
    assert checked.diagnostics.overdispersed_probe is not None
    assert checked.diagnostics.converged is not None and checked.diagnostics.extensions in (0, 1)
    assert checked.hyperparameters["calibrated"] is False


def test_zero_localization_is_allowed_with_a_warning(small_problem):
    model, loader = small_problem
    with pytest.warns(LocalizationWarning, match="localization = 0"):
        res = slt.estimate_llc(model, loader, mse, num_chains=2, num_draws=30, lr=1e-5, localization=0.0)
    assert math.isfinite(res.llc_mean) and res.hyperparameters["localization"] == 0.0


def test_bare_pytorch_loss_is_refused_with_the_expected_signature(small_problem):
    model, loader = small_problem
    for bad in (F.mse_loss, torch.nn.MSELoss()):
        with pytest.raises(ValueError, match=r"loss_fn\(model, batch\)"):
            slt.estimate_llc(model, loader, bad, num_chains=2, num_draws=10, lr=1e-4, localization=1.0)


def test_landscape_takes_loader_then_loss_and_refuses_the_old_order(small_problem):
    model, loader = small_problem
    curve = slt.symmetry.interpolate(model, model, loader, mse, num_points=3)
    assert np.allclose(curve.losses, curve.losses[0]) and curve.losses[0] < 1e-10
    with pytest.raises(TypeError, match="swapped"):
        slt.symmetry.interpolate(model, model, mse, loader, num_points=3)


def test_jacobian_rank_uses_float32_tolerance_and_flags_non_morse_bott_points():
    from slt_tools.theory import NotMorseBottWarning, dln_jacobian_rank_llc

    last_cut = dln_at((9, 4, 6), 1, (1,))  # rank(J)/2 = Aoyagi's 29/2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dln_jacobian_rank_llc([l.weight for l in last_cut.layers]) == 29 / 2  # float32 weights as they are
    both_cut = dln_at((9, 4, 6), 1, (0, 1))  # rank(J)/2 = 7 < 29/2: not Morse–Bott
    with pytest.warns(NotMorseBottWarning, match="not Morse–Bott"):
        assert dln_jacobian_rank_llc([l.weight for l in both_cut.layers]) == 7


# ---------------------------------------------------------------- registry and step paths
def test_a_registered_rule_is_usable_everywhere(small_problem):
    """Adding a sampler is one register() call: a renamed copy of SGLD gives SGLD's chains."""
    from slt_tools.sampling import rules

    if "sgld_test_copy" not in rules.RULES:
        rules.register(rules.Rule("sgld_test_copy", *[getattr(rules.RULES["sgld"], f) for f in
                                                       ("update", "init", "first_move", "preconditioner",
                                                        "defaults")]))
    model, loader = small_problem
    kw = dict(num_chains=2, num_draws=30, lr=1e-4, localization=10.0, mala_every=5)
    a, b = _quiet(model, loader, mse, **kw), _quiet(model, loader, mse, sampler="sgld_test_copy", **kw)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    assert b.diagnostics.mala_acceptance == a.diagnostics.mala_acceptance


def _compiled_run(model, loader):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = slt.estimate_llc(model, loader, mse, num_chains=2, num_draws=20, lr=1e-4, localization=10.0,
                               compile=True)
    return res, [w for w in caught if issubclass(w.category, SamplingFallbackWarning)]


def test_a_pinned_step_that_does_not_reproduce_the_compiled_call_is_not_used(small_problem, monkeypatch):
    from slt_tools.sampling import compiled, steps

    model, loader = small_problem
    eager = _quiet(model, loader, mse, num_chains=2, num_draws=20, lr=1e-4, localization=10.0)
    real_call = compiled.PinnedStep.__call__

    def wrong(self, *args):
        out = real_call(self, *args)
        return None if out is None else (out[0] + 1.0, *out[1:])

    monkeypatch.setattr(compiled.PinnedStep, "__call__", wrong)
    monkeypatch.setattr(steps, "_WARNED", set())
    monkeypatch.setattr(steps, "_VERIFIED", {})
    res, caught = _compiled_run(model, loader)
    assert any("not pinned" in str(w.message) for w in caught), [str(w.message) for w in caught]
    np.testing.assert_allclose(res.loss_trace, eager.loss_trace, rtol=1e-4, atol=1e-7)


class _PassNeverRuns:
    """A compile record as a torch that accepts the custom pass but never calls it would leave it."""

    compiles = 0

    @property
    def passes_ran(self):
        return 0

    @passes_ran.setter
    def passes_ran(self, value):
        pass

    def snapshot(self):
        return self.compiles, 0


def test_compiled_steps_notice_when_the_graph_rewrites_do_not_run(monkeypatch):
    """One warning, same numbers (a fresh shape forces a fresh compile)."""
    from slt_tools.sampling import compiled, steps

    model = dln_at((5, 3, 5), 1, (1,), seed=7)
    loader = teacher_loader(model, 300, 30, 5)
    monkeypatch.setattr(steps, "_WARNED", set())
    monkeypatch.setattr(compiled, "REWRITES", _PassNeverRuns())
    res, caught = _compiled_run(model, loader)
    assert res.diagnostics.compiled
    assert sum("graph rewrites" in str(w.message) for w in caught) == 1, [str(w.message) for w in caught]
    eager = _quiet(model, loader, mse, num_chains=2, num_draws=20, lr=1e-4, localization=10.0)
    np.testing.assert_allclose(res.loss_trace, eager.loss_trace, rtol=1e-4, atol=1e-7)


def test_rewrites_status_reads_the_compile_record():
    from slt_tools.sampling import compiled

    before = compiled.REWRITES.snapshot()
    compiled.REWRITES.compiles += 2
    compiled.REWRITES.passes_ran += 1
    try:
        why = compiled.rewrites_status(before)
    finally:
        compiled.REWRITES.compiles -= 2
        compiled.REWRITES.passes_ran -= 1
    assert why is not None and "2 graph(s)" in why and "on 1" in why
    assert compiled.rewrites_status(compiled.REWRITES.snapshot()) is None


def test_real_compiled_steps_run_the_rewrites(small_problem):
    from slt_tools.sampling import compiled

    model, loader = small_problem
    before = compiled.REWRITES.snapshot()
    res, caught = _compiled_run(model, loader)
    assert res.diagnostics.compiled and not caught
    assert compiled.rewrites_status(before) is None


# ---------------------------------------------------------------- what loss_fn sees
def test_loss_fn_sees_the_sampled_weights_however_it_reads_them():
    """A weight-decay term over model.parameters() and a hand-written forward through model.lin.weight must be
    evaluated at the chain's θ, not at w* (they were: λ̂ 1.34 where 1.75 is right)."""
    from slt_tools.sampling.functional import FlatParams, make_loss

    lin = torch.nn.Linear(3, 2)
    model = torch.nn.Sequential()
    model.add_module("lin", lin)
    x, y = torch.randn(8, 3), torch.randn(8, 2)

    def by_call(m, b):
        return F.mse_loss(m(b[0]), b[1]) + 0.1 * sum(p.pow(2).sum() for p in m.parameters())

    def by_attribute(m, b):
        return F.mse_loss(b[0] @ m.lin.weight.T + m.lin.bias, b[1]) + 0.1 * sum(p.pow(2).sum() for p in m.parameters())

    layout = FlatParams.from_model(model, [n for n, _ in model.named_parameters()])
    theta = layout.flatten(model) + 0.5
    moved = torch.nn.Sequential()
    moved.add_module("lin", torch.nn.Linear(3, 2))
    layout.write_to(moved, theta)
    for fn in (by_call, by_attribute):
        got = make_loss(model, layout, fn)(theta, (x, y))
        assert torch.allclose(got, fn(moved, (x, y))), fn.__name__
        batched = torch.func.vmap(make_loss(model, layout, fn), in_dims=(0, None))(torch.stack([theta, theta - 0.5]),
                                                                                   (x, y))
        assert torch.allclose(batched, torch.stack([fn(moved, (x, y)), fn(model, (x, y))]))
    assert torch.allclose(layout.flatten(model), theta - 0.5)  # the model itself is untouched


def test_models_are_sampled_in_eval_mode_and_their_modes_restored():
    """Dropout off by default (a seeded run reproduces, and equals the same network without dropout); the caller's
    train/eval flags come back module by module; train mode is recorded and warned about."""
    from slt_tools.sampling.estimate import ModeWarning

    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    with_dropout = torch.nn.Sequential(body[0], body[1], torch.nn.Dropout(0.5), body[2])
    x = torch.randn(400, 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, body(x).detach()), batch_size=50)
    with_dropout.train()
    with_dropout[2].eval()  # a mixed state, to be restored exactly
    kw = dict(num_chains=2, num_draws=30, lr=1e-4, localization=10.0, seed=1)
    a, b, plain = (_quiet(m, loader, mse, **kw) for m in (with_dropout, with_dropout, body))
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    np.testing.assert_allclose(a.loss_trace, plain.loss_trace, rtol=1e-6, atol=1e-9)
    assert a.hyperparameters["model_mode"] == "eval"
    assert [m.training for m in with_dropout] == [True, True, False, True]
    with pytest.warns(ModeWarning, match="Dropout"):
        t = slt.estimate_llc(with_dropout, loader, mse, model_mode="train", **kw)
    assert t.hyperparameters["model_mode"] == "train"
    assert [m.training for m in with_dropout] == [True, True, False, True]


# ---------------------------------------------------------------- honest hand-set runs
def test_a_burn_in_transient_is_not_called_stationary():
    """A trace rising from 8.8 to 24 in every chain (chains started at w* still climbing) used to pass: the Geweke
    z-scores were computed and ignored. A stationary trace of the same noise still passes."""
    from slt_tools.sampling.diagnostics import summarize_chains

    rng = np.random.default_rng(3)
    t = np.arange(400)
    rising = 8.8 + (24 - 8.8) * (1 - np.exp(-t / 60))
    noise = 0.5 * rng.standard_normal((6, 400))
    nbeta = 100.0
    d = summarize_chains((rising + noise) / nbeta, 0.0, nbeta, 1e9)
    assert not d["stationary"] and any("initial transient" in r for r in d["not_stationary_reasons"])
    flat = summarize_chains((24 + noise) / nbeta, 0.0, nbeta, 1e9)
    assert flat["stationary"], flat["not_stationary_reasons"]


def test_low_mala_acceptance_warns_with_advice_in_the_right_direction(small_problem):
    from slt_tools.sampling.result import StepSizeWarning

    model, loader = small_problem
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = slt.estimate_llc(model, loader, mse, num_chains=2, num_draws=60, lr=3e-3, localization=10.0,
                               mala_every=3, on_divergence="exclude")
    acc = res.diagnostics.mala_acceptance
    messages = [str(w.message) for w in caught if issubclass(w.category, StepSizeWarning)]
    assert acc < 0.9 and messages and "smaller lr" in messages[0], (acc, messages)
    assert not any("or a larger lr" in str(w.message) for w in caught)


def test_sum_reduced_loss_is_refused_and_mean_losses_pass(small_problem):
    """A reduction='sum' loss used to be read as "w* is not a local minimum"."""
    model, loader = small_problem
    with pytest.raises(ValueError, match="sum-reduced"):
        slt.estimate_llc(model, loader, lambda m, b: F.mse_loss(m(b[0]), b[1] + 0.1, reduction="sum"), num_chains=2,
                         num_draws=10, lr=1e-4, localization=1.0)
    for fn in (lambda m, b: F.mse_loss(m(b[0]), b[1] + 0.1),
               lambda m, b: F.mse_loss(m(b[0]), b[1] + 0.1) + 0.01 * sum(p.pow(2).sum() for p in m.parameters())):
        _quiet(model, loader, fn, num_chains=2, num_draws=10, lr=1e-4, localization=1.0)
