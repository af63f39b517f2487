"""The service's HTTP layer: one router per resource, request/response models, typed dependencies."""
