"""Test configuration: fixtures live in tests/support/ modules, one per resource."""

pytest_plugins = [
    "tests.support.paths",
    "tests.support.redis",
    "tests.support.models",
    "tests.support.tokenizers",
    "tests.support.service",
]
