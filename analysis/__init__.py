"""Run records -> tidy pandas frames -> tables, seaborn figures and reports. Imports neither torch nor Lightning."""

from analysis.runs import Runs, evals_frame, example_forgetting_frame, forgetting_frame, load_records, load_runs

__all__ = ["Runs", "evals_frame", "example_forgetting_frame", "forgetting_frame", "load_records", "load_runs"]
