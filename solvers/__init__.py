"""Fixed-point and root-finding algorithms for `fixpoint`."""

from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .newton import Newton as Newton
from .picard import Picard as Picard
