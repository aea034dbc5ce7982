"""Algorithms that consume curvature operators: eigensolvers and estimators."""
