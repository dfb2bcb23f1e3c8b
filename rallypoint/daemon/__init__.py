"""rallyd, the per-node daemon: config, rendezvous loop, worker supervision, sd_notify."""
