"""facetrace: a workflow-orchestrated platform for detectors of AI-generated faces.

The package maps the repository's top-level folders: ``facetrace.db`` (db/),
``facetrace.tasks`` (tasks/), ``facetrace.flows`` (flows/), ``facetrace.expectations``
(expectations/) and ``facetrace.deployments`` (deployments/).
"""

__version__ = "0.1.0"
