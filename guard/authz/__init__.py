"""What the caller may do: the authorization middleware (``authorization``) and the judge that
decides one request (``judge``), the MLflow route table as data (``route_table.toml``, read by
``routes``), the ids a request names (``identifiers``) and how they become resources
(``resolve``, ``references``, ``otlp``), search filtering (``search``), answers filtered on their
way back (``answers``), promotion rules (``promotion``), system tags (``systemtags``), GraphQL
(``graphql`` and its schema tables, ``graphql_fields``) and the policy engine, its store, runtime
and casbin adapter.

It reads the principal from the request context (``guard.edge.context``), never from identity's
internals, and asks MLflow through ``guard.upstream.client``. It may import ``guard.errors``,
``guard.patterns``, the edge, upstream and the store, and must not import identity, audit,
admin, cli, settings or app.
"""
