"""Run records -> tidy pandas frames -> tables, seaborn figures and reports. Imports neither torch nor Lightning."""

from analysis.runs import evals_frame, forgetting_frame, load_records

__all__ = ["evals_frame", "forgetting_frame", "load_records"]
