"""The mindgap application layer: the `mindgap` CLI, the `up` orchestrator, evaluation and the bench.

It may import `shared`, `services` and `trainer`; none of them imports it.
"""
