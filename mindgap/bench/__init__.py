"""`mindgap bench`: measure mindgap against its natural baselines; results go to `bench/results/`."""
