"""Group testing itself, numpy only: algorithms, group formation, the cost model and planner,
calibration, simulated buckets."""
