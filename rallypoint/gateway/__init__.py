"""The gateway: rallyd's client-facing completions API, which outlives any one replica's driver."""
