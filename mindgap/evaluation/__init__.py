"""Evaluation: accuracy on benchmarks and data files (`mindgap eval`) and the policy-gap report (`mindgap gap`)."""
