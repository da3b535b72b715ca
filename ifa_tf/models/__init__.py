"""The shared ranking skeleton and the sequence modules that tell the zoo models apart."""

from ifa_tf.models.candidate_set_ranker import CandidateSetRanker
from ifa_tf.models.interest_modules import (AveragePoolingInterest, DAREInterest, ETAInterest,
                                            FullTargetAttentionInterest,
                                            LinearAttentionInterest, MIRRNInterest,
                                            RecentDINInterest, SAMInterest, SDIMInterest,
                                            SIMHardInterest, SIMSoftInterest, TWINInterest,
                                            TWINV2Interest)

__all__ = [
    "AveragePoolingInterest",
    "CandidateSetRanker",
    "DAREInterest",
    "ETAInterest",
    "FullTargetAttentionInterest",
    "LinearAttentionInterest",
    "MIRRNInterest",
    "RecentDINInterest",
    "SAMInterest",
    "SDIMInterest",
    "SIMHardInterest",
    "SIMSoftInterest",
    "TWINInterest",
    "TWINV2Interest",
]
