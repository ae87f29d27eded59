"""The HTTP API of `facetrace api`: the champion detector over HTTP (FastAPI on uvicorn).

``service`` holds the serving core (model, micro-batcher, hot swap, prediction recorder); ``app``
the FastAPI application and its routes; ``static/`` the page served at ``/``.
"""
