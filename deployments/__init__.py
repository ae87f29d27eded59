"""facetrace.deployments"""
