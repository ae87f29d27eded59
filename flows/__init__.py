"""facetrace.flows"""
