"""The public API, name by name: a name that appears or disappears fails here until
this list is updated, so every API change is deliberate."""

import importlib
import subprocess
import sys

import pytest

import fixpoint

API = {
    "fixpoint": """AbstractAdjoint AbstractCachedModel Blockwise Compaction ContractionEstimate
        Disagreement FiniteSum GameConstants SmallGainCertificate contraction_estimate
        game_constants small_gain_certificate ImplicitAdjoint LyapunovEstimate NeumannAdjoint
        PhantomAdjoint RESULTS ReversibleAdjoint Solution SolveError UnrolledAdjoint
        custom_fixed_point custom_root data_parallel datasets decode first_disagreement
        fixed_point internal layers lyapunov_estimate max_norm rms_norm root_find scan solvers
        two_norm uncached""",
    "fixpoint.solvers": """AbstractMonotoneLinear AbstractProximal Anderson
        BestResponse Broyden DEER ELK ForwardBackward GSJacobiDecoding GaussSeidel Halpern
        Homotopy HybridDecoding Jacobi JacobiDecoding LookaheadDecoding MeanField
        MonotoneMatrix NGramPool Newton NonNegative PeacemanRachford Picard PicardSum
        QuasiDEER Reversible Sequential SequentialDecoding VarianceReducedHalpern""",
    "fixpoint.layers": """CGS CausalTransformer CircularConvMonotone ConvMonDEQ DEQ
        DiagonalGRUCell FixedPointRNN FixedPointRNNCoefficients FixedPointRNNMap GCN GIN
        Graph IGNN ImplicitSSM MonDEQ MonotoneDBM ParallelRNN SelectiveSSM SubhomogeneousDEQ
        SubhomogeneousMap ar_loss batch_graphs consistency_loss correction_iterates
        gcn_aggregate graph_readout jacobi_trajectories jacobian_penalty lm_loss
        normalised_adjacency pad_graph perron_root spectral_norm spectral_radius
        thompson_distance weight_norm""",
    "fixpoint.internal": """spectral_radius_jvp AbstractDecodingSolver AbstractReversibleSolver
        AbstractScanSolver AbstractSolver Evaluation LoopScalars Problem ReversibleState
        ScanProblem Step Time as_python_number check_bool check_compaction check_instance
        check_int check_number check_tolerances checked compacted_while_loop converged
        fori_loop iterate_scan linear_recurrence meets once_per_shapes raise_if_failed
        scaled_size scan_tolerances termination while_loop""",
    "fixpoint.datasets": """InterferenceGame interference_game water_filling ASCII_VOCAB
        ChainsDataset ClassificationExample FlowExample GRAPH_FAMILIES GROUPS GVIExample
        batch_gvi chains_dataset count_params decode_text encode flow_dataset flow_mse
        graph_classification_dataset gvi_backup gvi_dataset gvi_metrics multiplication_table
        node_accuracy random_batches stdlib_text word_problem""",
}


@pytest.mark.parametrize("module", sorted(API))
def test_public_names(module):
    public = {n for n in dir(importlib.import_module(module)) if not n.startswith("_")}
    expected = set(API[module].split())
    assert public - expected == set(), f"new public names in {module}: update API"
    assert expected - public == set(), f"names gone from {module}: update API"


def test_every_public_name_is_documented():
    for module in API:
        mod = importlib.import_module(module)
        assert mod.__doc__, module
        for name in API[module].split():
            obj = getattr(mod, name)
            if callable(obj) and not isinstance(obj, type(fixpoint)):
                assert obj.__doc__, f"{module}.{name} has no docstring"


def test_one_top_level_import_name():
    # The folders solvers/, layers/ and datasets/ are importable only inside `fixpoint`.
    code = (
        "import importlib.util, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "
        "print([m for m in ('solvers', 'layers', 'datasets') if importlib.util.find_spec(m)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert out.stdout.strip() == "[]"


def test_library_code_never_imports_private_core_modules():
    import pathlib
    import re

    root = pathlib.Path(fixpoint.__file__).parent.parent
    for folder in ("solvers", "layers", "datasets"):
        for path in (root / folder).glob("*.py"):
            text = path.read_text()
            assert not re.search(r"fixpoint\._\w", text), f"{path} imports a private module"


def _public_callables():
    """`(qualified name, function)` for every public function, constructor and
    method that a public class introduces (an override is covered by the base
    class that introduced the method, e.g. a solver's `step` by `AbstractSolver.step`)."""
    import inspect

    for module in API:
        mod = importlib.import_module(module)
        for name in API[module].split():
            obj = getattr(mod, name)
            if inspect.ismodule(obj):
                continue
            if inspect.isclass(obj):
                if obj.__init__ is not object.__init__:
                    yield f"{module}.{name}", obj
                for attr, member in vars(obj).items():
                    if attr.startswith("_") and attr != "__call__":
                        continue
                    introduced = not any(attr in vars(base) for base in obj.__mro__[1:])
                    if inspect.isfunction(member) and introduced:
                        yield f"{module}.{name}.{attr}", member
            elif inspect.isfunction(obj):
                yield f"{module}.{name}", obj


def test_public_signatures_are_annotated():
    # Every argument and return of the public API has a type (jaxtyping for arrays),
    # which pyright checks (`.ci/typecheck`).
    import inspect

    missing = []
    for qual, fn in _public_callables():
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # pragma: no cover  (builtins)
            continue
        for p in sig.parameters.values():
            if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty:
                missing.append(f"{qual}: argument `{p.name}`")
        if not inspect.isclass(fn) and sig.return_annotation is inspect.Signature.empty:
            missing.append(f"{qual}: return")
    assert not missing, f"{len(missing)} unannotated:\n" + "\n".join(missing)


# The constructors of the options users write most, as `inspect.signature` gives
# them: a rename or a change of order (what is positional, what is keyword-only)
# fails here until this list is updated. Tolerances come first, then the norm;
# every other option is keyword-only.
SIGNATURES = {
    "fixpoint.solvers": {
        "Picard": "rtol, atol, norm, *, damping",
        "Anderson": "rtol, atol, norm, *, history, damping, ridge, max_weight",
        "Newton": "rtol, atol, norm, *, linear_solver, damping, min_step",
        "Broyden": "rtol, atol, norm, *, history, min_step",
        "Halpern": "rtol, atol, norm, *, restart_ratio",
        "BestResponse": "rtol, atol, norm, *, order, damping, seed",
        "Reversible": "rtol, atol, norm, *, beta",
        "Homotopy": (
            "rtol, atol, norm, *, initial_step, max_step, min_step, corrector_rtol, max_corrections"
        ),
        "VarianceReducedHalpern": (
            "rtol, atol, norm, *, batch_size, refresh_every, restart_ratio, seed"
        ),
        "ForwardBackward": "rtol, atol, norm, *, alpha, divergence_ratio",
        "PeacemanRachford": "rtol, atol, norm, *, alpha, divergence_ratio",
        "NonNegative": "",
        "MeanField": "binary, groups, categories, *, observed, values, newton_steps",
        "Sequential": "rtol, atol, norm",
        "Jacobi": "rtol, atol, norm, *, window",
        "GaussSeidel": "rtol, atol, norm, *, block_size",
        "PicardSum": "rtol, atol, norm, *, window",
        "DEER": "rtol, atol, norm",
        "QuasiDEER": "rtol, atol, norm, *, assume_diagonal, batch_size",
        "ELK": (
            "rtol, atol, norm, *, lambda_0, adaptive, decrease, increase, assume_diagonal, "
            "batch_size"
        ),
        "SequentialDecoding": "",
        "JacobiDecoding": "*, window",
        "GSJacobiDecoding": "*, block_size",
        "HybridDecoding": "*, block_size, parallel_tokens",
        "LookaheadDecoding": "*, window, ngram, guesses",
    },
    "fixpoint": {
        "ImplicitAdjoint": "rtol, atol, *, linear_solver, restart, max_restarts, compaction",
        "PhantomAdjoint": "*, steps, damping",
        "NeumannAdjoint": "*, terms",
        "UnrolledAdjoint": "*, checkpoints",
        "ReversibleAdjoint": "rtol",
        "FiniteSum": "fn, num_components",
        "Compaction": "*, factor, min_bucket, min_batch",
    },
}


def _signature(cls) -> str:
    import inspect

    out = []
    for p in inspect.signature(cls).parameters.values():
        if p.kind is p.KEYWORD_ONLY and "*" not in out:
            out.append("*")
        out.append(p.name)
    return ", ".join(out)


@pytest.mark.parametrize("module", sorted(SIGNATURES))
def test_option_signatures(module):
    mod = importlib.import_module(module)
    got = {name: _signature(getattr(mod, name)) for name in SIGNATURES[module]}
    assert got == SIGNATURES[module]


def test_a_relative_tolerance_of_one_or_more_is_refused():
    # `GaussSeidel(16)` once meant `block=16`; with the tolerances first it would
    # silently mean `rtol=16`, so it is refused with a message that says why.
    from fixpoint import solvers

    for make in (
        lambda: solvers.GaussSeidel(16),
        lambda: solvers.Picard(1.0, 1e-6),
        lambda: solvers.QuasiDEER(2),
        lambda: fixpoint.ImplicitAdjoint(5),
    ):
        with pytest.raises(ValueError, match=r"`rtol` must be below 1.*keyword-only"):
            make()
    with pytest.raises(TypeError, match="positional"):
        solvers.Anderson(1e-6, 1e-6, fixpoint.max_norm, 5)  # pyright: ignore
    with pytest.raises(ValueError, match=r"custom_fixed_point: `rtol` must be below 1"):
        fixpoint.custom_fixed_point(lambda y, a: y, rtol=3.0)


def test_results_print_by_name():
    import jax
    import jax.numpy as jnp

    R = fixpoint.RESULTS
    assert repr(R.successful) == "RESULTS.successful"
    assert str(R.max_steps_reached) == "RESULTS.max_steps_reached"
    batch = jax.vmap(lambda x: R.where(x > 0, R.successful, R.diverged))(jnp.arange(3))
    assert repr(batch) == "RESULTS[diverged, successful, successful]"
    # Other enumerations keep Equinox's own repr.
    import equinox as eqx

    class Other(eqx.Enumeration):
        a = "message a"

    assert repr(Other.a).endswith("Other<message a>")
