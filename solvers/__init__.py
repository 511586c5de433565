"""Fixed-point and root-finding algorithms for `fixpoint`."""

from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .newton import Newton as Newton
from .picard import Picard as Picard
from .splitting import AbstractMonotoneLinear as AbstractMonotoneLinear
from .splitting import ForwardBackward as ForwardBackward
from .splitting import MonotoneMatrix as MonotoneMatrix
from .splitting import PeacemanRachford as PeacemanRachford
