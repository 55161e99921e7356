"""The edge: what every request passes before anyone asks who is calling.

It owns the request context (request id, client address, the principal slot later layers fill),
allowed hosts, CORS, security headers, body framing, reading and deadlines, the failure rate
limiter, the uvicorn protocol layer, artifact path canonicalization and request data read exactly
as MLflow reads it. It builds on ``guard.errors`` alone and must not import identity, authz,
audit, upstream, admin, store, cli, settings or app; the one exception is the ``Principal`` type
from ``guard.identity.base``, named only for type checking.
"""
