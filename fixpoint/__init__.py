"""fixpoint: differentiable fixed points and equilibria in JAX."""

from ._adjoint import AbstractAdjoint as AbstractAdjoint
from ._adjoint import ImplicitAdjoint as ImplicitAdjoint
from ._adjoint import NeumannAdjoint as NeumannAdjoint
from ._adjoint import PhantomAdjoint as PhantomAdjoint
from ._adjoint import UnrolledAdjoint as UnrolledAdjoint
from ._compact import Compaction as Compaction
from ._compact import check_compaction as check_compaction
from ._compact import compacted_while_loop as compacted_while_loop
from ._convergence import converged as converged
from ._convergence import meets as meets
from ._convergence import scaled_size as scaled_size
from ._custom import custom_fixed_point as custom_fixed_point
from ._custom import custom_root as custom_root
from ._decode import AbstractCachedModel as AbstractCachedModel
from ._decode import AbstractDecodingSolver as AbstractDecodingSolver
from ._decode import Divergence as Divergence
from ._decode import decode as decode
from ._decode import first_divergence as first_divergence
from ._errors import SolveError as SolveError
from ._errors import checked as checked
from ._errors import raise_if_failed as raise_if_failed
from ._fixed_point import fixed_point as fixed_point
from ._iterate import LoopScalars as LoopScalars
from ._iterate import termination as termination
from ._norm import max_norm as max_norm
from ._norm import rms_norm as rms_norm
from ._norm import two_norm as two_norm
from ._parallel import data_parallel as data_parallel
from ._problem import Evaluation as Evaluation
from ._problem import Problem as Problem
from ._root_find import root_find as root_find
from ._scan import scan as scan
from ._scan_loop import iterate_scan as iterate_scan
from ._scan_solver import AbstractScanSolver as AbstractScanSolver
from ._scan_solver import ScanProblem as ScanProblem
from ._scan_solver import scan_tolerances as scan_tolerances
from ._solution import RESULTS as RESULTS
from ._solution import Solution as Solution
from ._solver import AbstractSolver as AbstractSolver
from ._solver import Step as Step
from ._solver import check_tolerances as check_tolerances
from ._time import Time as Time
from ._time import linear_recurrence as linear_recurrence

__version__ = "0.1.0"
