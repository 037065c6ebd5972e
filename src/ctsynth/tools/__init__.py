"""Studies the user runs on demand (their own DVC pipelines under studies/): grids over data and seeds."""
