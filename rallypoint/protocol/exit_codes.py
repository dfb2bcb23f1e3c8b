"""The exit codes a worker ends with on purpose, so rallyd can tell them from a crash.

The worker chooses them and the daemon acts on them (a bad checkpoint shrinks rather than
restarts), so they live with neither.
"""

BAD_CHECKPOINT = 3  # its shard failed to load: a restart onto the same files would fail the same way
BUILD_STUCK = 4     # a group build hung where no abort reaches it (a blocking NCCL init): start afresh
API_LOST = 6        # its API process died: the replica cannot take requests; start afresh

MEANING = {BAD_CHECKPOINT: "its shard failed to load", BUILD_STUCK: "a group build hung",
           API_LOST: "its API process died"}


def describe(code: int) -> str:
    """``code``, and what it means when the worker chose it."""
    return f"{code} ({MEANING[code]})" if code in MEANING else str(code)
