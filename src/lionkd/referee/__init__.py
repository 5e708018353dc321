"""The pairwise referee, shared by the Lion loop and by evaluation: its prompt (`prompt`), the reading of its
replies (`parse`), its verdict on a pair of answers (`verdict`) and the judging of pairs in both orders
(`pairs`). It knows answers a and b, not which role wrote them.
"""

from .pairs import RefereeCallError, judge_pairs, stream_judgements
from .parse import parse_scores
from .prompt import REFEREE, REFEREE_ORDERS, pairwise_messages
from .verdict import UNPARSEABLE, JudgeSummary, PairVerdict, summarise

__all__ = [
    "REFEREE",
    "REFEREE_ORDERS",
    "UNPARSEABLE",
    "JudgeSummary",
    "PairVerdict",
    "RefereeCallError",
    "judge_pairs",
    "pairwise_messages",
    "parse_scores",
    "stream_judgements",
    "summarise",
]
