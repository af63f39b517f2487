"""Test configuration: fixtures live in tests/fixtures/ modules, one per resource."""

pytest_plugins = [
    "tests.fixtures.paths",
    "tests.fixtures.redis",
    "tests.fixtures.models",
    "tests.fixtures.service",
]
