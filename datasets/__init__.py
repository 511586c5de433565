"""Datasets, generators and metrics for the demos and benchmarks: offline graph
tasks with exact targets, group word problems (state tracking), the standard
library's own text, and a power-control game (iterative water-filling). Nothing is
downloaded; networkx and scipy (the `graphs` extra) are imported only by the
generators that need them."""

from ._games import InterferenceGame as InterferenceGame
from ._games import interference_game as interference_game
from ._games import water_filling as water_filling
from ._graphs import GRAPH_FAMILIES as GRAPH_FAMILIES
from ._graphs import ChainsDataset as ChainsDataset
from ._graphs import ClassificationExample as ClassificationExample
from ._graphs import FlowExample as FlowExample
from ._graphs import GVIExample as GVIExample
from ._graphs import batch_gvi as batch_gvi
from ._graphs import chains_dataset as chains_dataset
from ._graphs import count_params as count_params
from ._graphs import flow_dataset as flow_dataset
from ._graphs import flow_mse as flow_mse
from ._graphs import graph_classification_dataset as graph_classification_dataset
from ._graphs import gvi_backup as gvi_backup
from ._graphs import gvi_dataset as gvi_dataset
from ._graphs import gvi_metrics as gvi_metrics
from ._graphs import node_accuracy as node_accuracy
from ._groups import GROUPS as GROUPS
from ._groups import multiplication_table as multiplication_table
from ._groups import word_problem as word_problem
from ._text import ASCII_VOCAB as ASCII_VOCAB
from ._text import decode_text as decode_text
from ._text import encode as encode
from ._text import random_batches as random_batches
from ._text import stdlib_text as stdlib_text
