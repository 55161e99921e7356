"""Who is calling: one provider per login method, behind the ``IdentityProvider`` protocol."""
