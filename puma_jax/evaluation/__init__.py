"""Evaluation: metrics (this package's `metrics`, `fid`) and, later, the evaluators and runner."""
