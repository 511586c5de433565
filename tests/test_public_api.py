"""The public API, name by name: a name that appears or disappears fails here until
this list is updated, so every API change is deliberate."""

import importlib
import subprocess
import sys

import pytest

import fixpoint

API = {
    "fixpoint": """AbstractAdjoint AbstractCachedModel Compaction Disagreement ImplicitAdjoint
        NeumannAdjoint PhantomAdjoint RESULTS Solution SolveError UnrolledAdjoint
        custom_fixed_point custom_root data_parallel datasets decode first_disagreement
        fixed_point internal layers max_norm rms_norm root_find scan solvers two_norm""",
    "fixpoint.solvers": """AbstractMonotoneLinear Anderson Broyden DEER ELK ForwardBackward
        GSJacobiDecoding GaussSeidel Halpern HybridDecoding Jacobi JacobiDecoding
        LookaheadDecoding MonotoneMatrix NGramPool Newton PeacemanRachford Picard PicardSum
        QuasiDEER Sequential SequentialDecoding""",
    "fixpoint.layers": """CGS CausalTransformer CircularConvMonotone ConvMonDEQ DEQ
        DiagonalGRUCell GCN GIN Graph IGNN MonDEQ ParallelRNN ar_loss batch_graphs
        consistency_loss correction_iterates gcn_aggregate graph_readout jacobi_trajectories
        jacobian_penalty lm_loss normalised_adjacency pad_graph perron_root spectral_norm
        spectral_radius weight_norm""",
    "fixpoint.internal": """AbstractDecodingSolver AbstractScanSolver AbstractSolver Evaluation
        LoopScalars Problem ScanProblem Step Time as_python_number check_bool
        check_compaction check_instance check_int check_number check_tolerances checked
        compacted_while_loop converged fori_loop iterate_scan linear_recurrence meets
        raise_if_failed scaled_size scan_tolerances termination while_loop""",
    "fixpoint.datasets": """ASCII_VOCAB ChainsDataset ClassificationExample FlowExample
        GRAPH_FAMILIES GVIExample batch_gvi chains_dataset count_params decode_text encode
        flow_dataset flow_mse graph_classification_dataset gvi_backup gvi_dataset
        gvi_metrics node_accuracy random_batches stdlib_text""",
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
