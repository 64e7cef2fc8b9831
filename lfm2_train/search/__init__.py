"""Hardware-in-the-loop architecture search: candidate layouts under a parameter budget, per-candidate
latency / memory measured in a subprocess on this machine, a short-training quality proxy, and ranking
by hypervolume contribution on the (quality, latency, memory) Pareto front."""

from .pareto import contributions, default_reference, dominates, hypervolume, pareto_front, pareto_layers, rank
from .select import Budgets, budget_violation, rank_rows
from .space import Candidate, attention_positions, count_parameters, enumerate_candidates

__all__ = ["Budgets", "Candidate", "attention_positions", "budget_violation", "contributions", "count_parameters",
           "default_reference", "dominates", "enumerate_candidates", "hypervolume", "pareto_front", "pareto_layers",
           "rank", "rank_rows"]
