"""Contracts shared by every mindgap process: schemas, Redis keys, grading, prompts, config and I/O.

Nothing in this package imports torch or vLLM at module level, so the service, the trainer and the
CLI can all depend on it cheaply.
"""
