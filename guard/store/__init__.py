"""The database: the SQLAlchemy engine, the table definitions (``db``) and the Alembic
migrations that create them (``migrations/``, shipped as package data).

Every package may import it; it imports nothing from the gateway, so a schema change never drags
request handling along.
"""
