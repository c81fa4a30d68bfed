"""The candidates stage of /recommend: the four personalised strategies, cold start, and how
their lists merge into one :class:`CandidateSet`."""

from bentos.candidates.cold_start import ColdStart
from bentos.candidates.merge import CandidateSet, take_turns
from bentos.candidates.strategies import STRATEGIES, Candidates

__all__ = ["STRATEGIES", "CandidateSet", "Candidates", "ColdStart", "take_turns"]
