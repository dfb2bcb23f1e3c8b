"""Collectives with deadlines, the collective watchdog and hang diagnosis."""
