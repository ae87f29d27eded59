"""facetrace.expectations"""
