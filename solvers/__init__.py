"""Fixed-point and root-finding algorithms for `fixpoint`."""

from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .decoding import JacobiDecoding as JacobiDecoding
from .decoding import SequentialDecoding as SequentialDecoding
from .deer import DEER as DEER
from .deer import ELK as ELK
from .deer import QuasiDEER as QuasiDEER
from .jacobi import GaussSeidel as GaussSeidel
from .jacobi import Jacobi as Jacobi
from .jacobi import Sequential as Sequential
from .newton import Newton as Newton
from .picard import Picard as Picard
from .splitting import AbstractMonotoneLinear as AbstractMonotoneLinear
from .splitting import ForwardBackward as ForwardBackward
from .splitting import MonotoneMatrix as MonotoneMatrix
from .splitting import PeacemanRachford as PeacemanRachford
