"""Hand-written CPU kernels (numba), where numpy alone cannot do the job well."""
