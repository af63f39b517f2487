"""The bench lines, one module each; every module exposes `run(ctx) -> LineResult`."""
