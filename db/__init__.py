"""facetrace.db"""
