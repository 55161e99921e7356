"""What the caller may do: the authorization middleware (``authorization``), the MLflow route
table as data (``route_table.toml``, read by ``routes``), resource resolution (``resolve``,
``references``, ``otlp``), search filtering (``search``), promotion rules (``promotion``), system
tags (``systemtags``), GraphQL (``graphql``) and the policy engine, its store, runtime and casbin
adapter.

It reads the principal from the request context (``guard.edge.context``), never from identity's
internals, and asks MLflow through ``guard.upstream.client``. It may import ``guard.errors``,
``guard.patterns``, the edge, upstream and the store, and must not import identity, audit,
admin, cli, settings or app.
"""
