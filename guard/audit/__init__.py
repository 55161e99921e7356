"""The audit trail: every request recorded, durably, in a tamper-evident chain.

``records`` builds what is written (and what is never written); ``chain`` seals records into a
hash chain per writer; ``spool`` appends them to a local, fsynced journal before anything is
forwarded; ``shipper`` moves the journal into the database exactly once; ``store`` holds and
queries the table; ``middleware`` hooks all of it into the request path.
"""
