"""The candidates stage of /recommend: the five personalised strategies (the two-tower one in
:mod:`bentos.candidates.two_tower`), cold start, and how their lists merge into one
:class:`CandidateSet`."""

from bentos.candidates.cold_start import ColdStart
from bentos.candidates.merge import CandidateSet, take_turns
from bentos.candidates.strategies import STRATEGIES, Candidates

__all__ = ["STRATEGIES", "CandidateSet", "Candidates", "ColdStart", "take_turns"]
