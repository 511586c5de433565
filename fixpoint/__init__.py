"""fixpoint: differentiable fixed points and equilibria in JAX.

`fixpoint` holds the user's API: the entry points, their results, the adjoints
and norms. The algorithms are in `fixpoint.solvers`, the Equinox layers in
`fixpoint.layers`, datasets and metrics for the demos in `fixpoint.datasets`,
and what a solver author needs in `fixpoint.internal`.
"""

from ._adjoint import AbstractAdjoint as AbstractAdjoint
from ._adjoint import ImplicitAdjoint as ImplicitAdjoint
from ._adjoint import NeumannAdjoint as NeumannAdjoint
from ._adjoint import PhantomAdjoint as PhantomAdjoint
from ._adjoint import UnrolledAdjoint as UnrolledAdjoint
from ._blockwise import Blockwise as Blockwise
from ._cache import uncached as uncached
from ._compact import Compaction as Compaction
from ._contraction import ContractionEstimate as ContractionEstimate
from ._contraction import GameConstants as GameConstants
from ._contraction import SmallGainCertificate as SmallGainCertificate
from ._contraction import contraction_estimate as contraction_estimate
from ._contraction import game_constants as game_constants
from ._contraction import small_gain_certificate as small_gain_certificate
from ._custom import custom_fixed_point as custom_fixed_point
from ._custom import custom_root as custom_root
from ._decode import Disagreement as Disagreement
from ._decode import decode as decode
from ._decode import first_disagreement as first_disagreement
from ._decode_solver import AbstractCachedModel as AbstractCachedModel
from ._errors import SolveError as SolveError
from ._finite_sum import FiniteSum as FiniteSum
from ._fixed_point import fixed_point as fixed_point
from ._fixed_point import root_find as root_find
from ._lyapunov import LyapunovEstimate as LyapunovEstimate
from ._lyapunov import lyapunov_estimate as lyapunov_estimate
from ._norm import max_norm as max_norm
from ._norm import rms_norm as rms_norm
from ._norm import two_norm as two_norm
from ._parallel import data_parallel as data_parallel
from ._reversible import ReversibleAdjoint as ReversibleAdjoint
from ._scan import scan as scan
from ._solution import RESULTS as RESULTS
from ._solution import Solution as Solution

# The subpackages come last: they build on the names above.
from . import internal as internal  # isort: skip
from . import solvers as solvers  # isort: skip
from . import layers as layers  # isort: skip
from . import datasets as datasets  # isort: skip

__version__ = "0.1.0"
