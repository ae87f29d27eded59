"""facetrace.tasks"""
