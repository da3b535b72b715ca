"""The shared ranking skeleton and the sequence modules that tell the zoo models apart."""

from ifa_tf.models.candidate_set_ranker import CandidateSetRanker
from ifa_tf.models.interest_modules import (AveragePoolingInterest, ETAInterest,
                                            FullTargetAttentionInterest,
                                            LinearAttentionInterest, RecentDINInterest,
                                            SDIMInterest, SIMHardInterest, SIMSoftInterest,
                                            TWINInterest, TWINV2Interest)

__all__ = [
    "AveragePoolingInterest",
    "CandidateSetRanker",
    "ETAInterest",
    "FullTargetAttentionInterest",
    "LinearAttentionInterest",
    "RecentDINInterest",
    "SDIMInterest",
    "SIMHardInterest",
    "SIMSoftInterest",
    "TWINInterest",
    "TWINV2Interest",
]
