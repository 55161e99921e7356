"""The ``mlflow-guard`` command: one module per command group (``serve`` for serve and
check-config, ``tokens``, ``policy`` for policy and role, ``audit``, ``directory`` for ldap),
what they share (``common``) and ``main``, which builds the parser and dispatches.

It parses arguments and calls into the package, nothing more; nothing in the gateway may import
it (it sits above ``guard.app``, which only ``serve`` loads, lazily).
"""
