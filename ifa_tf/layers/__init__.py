"""ifa_tf layers: written with `keras.ops`, so they run on TensorFlow, JAX and PyTorch."""

from ifa_tf.layers.candidate_self_attention import CandidateSelfAttention
from ifa_tf.layers.dare_attention import DAREAttention
from ifa_tf.layers.decayed_linear_attention import DecayedLinearAttention
from ifa_tf.layers.din_activation_unit import DINActivationUnit
from ifa_tf.layers.eta_search import ETASearch
from ifa_tf.layers.exact_matches import ExactMatches
from ifa_tf.layers.hashed_embedding import (
    HashedEmbedding,
    StackedHashedEmbedding,
    SummedHashedEmbedding,
)
from ifa_tf.layers.masked_average_pooling import MaskedAveragePooling
from ifa_tf.layers.masked_target_attention import MaskedTargetAttention
from ifa_tf.layers.mirrn import MIRRNAttention
from ifa_tf.layers.mlp_tower import MLPTower
from ifa_tf.layers.normalized_linear_attention import NormalizedLinearAttention
from ifa_tf.layers.sam_memory import SAMMemory
from ifa_tf.layers.sdim_attention import SDIMAttention
from ifa_tf.layers.sim_hard_search import SIMHardSearch
from ifa_tf.layers.sim_soft_search import SIMSoftSearch
from ifa_tf.layers.twin_attention import TWINAttention
from ifa_tf.layers.twin_v2_clustering import TWINV2Clustering

__all__ = [
    "CandidateSelfAttention",
    "DAREAttention",
    "DecayedLinearAttention",
    "DINActivationUnit",
    "ETASearch",
    "ExactMatches",
    "HashedEmbedding",
    "MaskedAveragePooling",
    "MaskedTargetAttention",
    "MIRRNAttention",
    "MLPTower",
    "NormalizedLinearAttention",
    "SAMMemory",
    "SDIMAttention",
    "SIMHardSearch",
    "SIMSoftSearch",
    "StackedHashedEmbedding",
    "SummedHashedEmbedding",
    "TWINAttention",
    "TWINV2Clustering",
]
