"""Forwarding to MLflow: the HTTP/1.1 client (``client``) and the forwarder (``proxy``).

It knows no users and decides nothing: it may import ``guard.errors`` and the edge (body
deadlines, the artifact download routes), and must never import identity, authz, audit, admin,
store, cli, settings or app.
"""
