"""The casbin model and the shipped default policies (data files, packaged with the gateway)."""
