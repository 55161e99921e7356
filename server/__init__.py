"""Starting and supervising the upstream MLflow server that the gateway embeds."""
