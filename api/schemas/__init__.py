"""The pydantic models of the HTTP API: request bodies, query strings and response documents.

``/openapi.json`` is generated from these (``api.openapi``); the handlers validate requests and
shape responses with the same classes, so the document cannot drift from what is served.
"""
