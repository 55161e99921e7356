"""The gateway's own management surface: the ``/guard/api/`` application (``api``), the
governance operations it and the CLI share (``governance``), who may change the policy
(``delegation``), people's own tokens (``personal``: the rules; ``tokenpage``: the
``/guard/tokens`` page, which calls the same functions as the API) and the CLI's client for a
remote gateway (``remote``).

It calls into authz, identity, audit, the edge, upstream and the store, but must not import
``guard.app``, ``guard.cli`` or ``guard.settings``: the application hands it what it needs, so
the console that lands here next goes through the same functions and no second authorization
path.
"""
