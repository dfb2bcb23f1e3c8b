"""rallyctl, the admin CLI: reads etcd directly, so it works from any host that reaches etcd."""
