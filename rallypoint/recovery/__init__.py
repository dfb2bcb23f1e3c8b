"""The recovery state machine and its strategies (restart in place, warm spare, shrink)."""
