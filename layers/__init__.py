"""Equinox layers built on `fixpoint` and `solvers`."""

from .deq import DEQ as DEQ
from .mondeq import CircularConvMonotone as CircularConvMonotone
from .mondeq import ConvMonDEQ as ConvMonDEQ
from .mondeq import MonDEQ as MonDEQ
from .rnn import DiagonalGRUCell as DiagonalGRUCell
from .rnn import ParallelRNN as ParallelRNN
from .training import correction_iterates as correction_iterates
from .training import jacobian_penalty as jacobian_penalty
from .training import spectral_norm as spectral_norm
from .training import spectral_radius as spectral_radius
from .training import weight_norm as weight_norm
from .transformer import ASCII_VOCAB as ASCII_VOCAB
from .transformer import CausalTransformer as CausalTransformer
from .transformer import decode_text as decode_text
from .transformer import encode as encode
from .transformer import lm_loss as lm_loss
from .transformer import random_batches as random_batches
from .transformer import stdlib_text as stdlib_text
