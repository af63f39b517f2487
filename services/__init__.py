"""The rewrite service: Guided Re-solving over an engine, offline (`mindgap rewrite`) or as a REST service."""
