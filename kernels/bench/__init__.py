"""Microbenchmarks of the kernels (`rlipv2 bench kernels`) and the prepared GPU check script."""
