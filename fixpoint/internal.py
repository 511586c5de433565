"""The solver author's API: what a new solver, loop or layer is built from.

`fixpoint` holds what a user calls; this module holds what someone writing a
solver needs beyond that (as `optimistix.internal` does):

- **solver bases and protocols**: `AbstractSolver` (fixed points and roots:
  `init`/`step` returning a `Step`, on a `Problem` whose `evaluate` gives an
  `Evaluation`), `AbstractScanSolver` (recurrences, on a `ScanProblem` over a
  `Time` axis), `AbstractDecodingSolver` (parallel decoding);
- **the loops' building blocks**: the convergence rule (`converged`, `meets`,
  `scaled_size`), result bookkeeping (`termination`, `LoopScalars`), the scan
  loop (`iterate_scan`, `linear_recurrence`), compaction of finished samples
  (`compacted_while_loop`), loops that also work inside `shard_map`
  (`while_loop`, `fori_loop`), errors under `jit` (`checked`,
  `raise_if_failed`), and `once_per_shapes` for a trace-time check of a user's
  function that a repeated call should not trace again;
- **option validators** with messages that name the argument (`check_int`,
  `check_number`, `check_bool`, `check_instance`, `check_tolerances`,
  `check_compaction`, `scan_tolerances`) and `as_python_number`, the field
  converter that lets an option be a NumPy scalar.

Every name here is documented where it is defined. These names may change
between minor versions more freely than `fixpoint`'s own.
"""

from ._cache import once_per_shapes as once_per_shapes
from ._checks import as_python_number as as_python_number
from ._checks import check_bool as check_bool
from ._checks import check_instance as check_instance
from ._checks import check_int as check_int
from ._checks import check_number as check_number
from ._compact import check_compaction as check_compaction
from ._compact import compacted_while_loop as compacted_while_loop
from ._contraction import spectral_radius_jvp as spectral_radius_jvp
from ._convergence import converged as converged
from ._convergence import meets as meets
from ._convergence import scaled_size as scaled_size
from ._decode_solver import AbstractDecodingSolver as AbstractDecodingSolver
from ._errors import checked as checked
from ._errors import raise_if_failed as raise_if_failed
from ._fixed_point_loop import LoopScalars as LoopScalars
from ._fixed_point_loop import termination as termination
from ._fixed_point_problem import Evaluation as Evaluation
from ._fixed_point_problem import Problem as Problem
from ._fixed_point_solver import AbstractSolver as AbstractSolver
from ._fixed_point_solver import Step as Step
from ._fixed_point_solver import check_tolerances as check_tolerances
from ._manual import fori_loop as fori_loop
from ._manual import while_loop as while_loop
from ._reversible import AbstractReversibleSolver as AbstractReversibleSolver
from ._reversible import ReversibleState as ReversibleState
from ._scan_loop import iterate_scan as iterate_scan
from ._scan_solver import AbstractScanSolver as AbstractScanSolver
from ._scan_solver import ScanProblem as ScanProblem
from ._scan_solver import scan_tolerances as scan_tolerances
from ._time import Time as Time
from ._time import linear_recurrence as linear_recurrence
