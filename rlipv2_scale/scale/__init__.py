"""Scaling studies: a measured cost model, planning, sweeps and reports."""
