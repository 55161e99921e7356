"""Who is calling: one provider per login method behind the ``IdentityProvider`` protocol
(``base``), gateway tokens, service and personal (``tokens``), LDAP (``ldap``), the binding of
user names to the identity that first used them (``bindings``), credential failures counted
per user name across replicas (``throttle``) and the authentication middleware that asks the
providers and puts the principal into the request context (``authentication``); browser
sessions (``sessions``: the table and the cookie; ``browser``: the cookie as credentials, CSRF
for cookie writes, navigations sent to the login page), user blocks (``blocks``) and the login
pages (``login``: their handlers; ``forms``: ``next`` and the posted form; ``csrf``: the forms'
tokens; ``pages``: templates and static files); OpenID Connect issuers and their token checks
(``oidc``, the one module using authlib and joserfc), machines with an issuer's JWT
(``bearer``) and browser single sign-on with them
(``sso``: login, callback, back-channel logout).

It may import ``guard.errors``, the edge (the request context, the failure rate limiter) and the
store, and must not import authz, audit, upstream, admin, cli, settings or app: what a caller may
do is authz's question, answered from the principal in the request context.
"""
