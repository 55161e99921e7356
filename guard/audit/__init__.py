"""The audit trail: every request recorded, durably, in a tamper-evident chain.

``records`` builds what is written (and what is never written); ``chain`` seals records into a
hash chain per writer; ``spool`` appends them to a local, fsynced journal before anything is
forwarded; ``shipper`` moves the journal into the database exactly once; ``store`` holds and
queries the table; ``trail`` hooks all of it into the request path. It records decisions and
makes none: it may read the edge (request context and data), identity's credential parsing, the
store, ``guard.settings``, ``guard.errors`` and ``guard.patterns``, and must not import authz,
upstream, admin, cli or app.
"""
