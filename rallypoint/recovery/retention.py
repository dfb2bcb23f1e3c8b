"""What the leader deletes of old generations, so that etcd holds a window, not the cluster's age.

Every record keyed by generation and written without a lease (plans, releases, re-plan requests,
abort orders, taints, recovery events, group stores) would otherwise stay forever, and those on a
lease (acks, diagnoses, drained reports) as long as the daemon or worker that wrote them: etcd's
key count would grow with every recovery, and so would the start of every worker and daemon,
which read ``control/``. The leader keeps the newest released generation, everything newer, and
the ``KEEP_GENS`` generations before it; nobody reads further back:

* workers and daemons follow only the current plan, its release and the current generation's
  re-plan request; abort orders are applied from the watch, never replayed; the leader counts the
  current plan's acks, daemons wait on the current generation's drained reports and follow new
  diagnoses;
* a taint matters while its group can still be carried over: its key names the generation the
  group was *built* in, which a carried-over group outlives, so a taint also has to have been
  written before the window's oldest generation was released (every member has configured a
  hundred generations since);
* ``rallyctl plan``/``events`` and the recovery benchmark read the window.

Keys: ``ClusterKeys.older_than``.
"""

from __future__ import annotations

from rallypoint.protocol.keys import ClusterKeys
from rallypoint.rendezvous.etcd import Delete, EtcdClient, Mod, prefix_end

KEEP_GENS = 100  # generations kept before the newest released one
PRUNE_EVERY = 10  # generations released between two prunes


def keep_from(released_gen: int, keep: int = KEEP_GENS) -> int:
    """The oldest generation kept when ``released_gen`` is the newest released one."""
    return released_gen - max(0, keep)


def prune_history(client: EtcdClient, keys: ClusterKeys, released_gen: int, keep: int = KEEP_GENS) -> dict[str, int]:
    """Delete every generation-keyed record older than ``keep_from(released_gen, keep)``.

    Args:
        client: the leader's etcd client.
        keys: the cluster's keys.
        released_gen: the newest released generation; neither it nor anything newer is touched.
        keep: generations kept before it.

    Returns:
        Keys deleted, by kind (``ClusterKeys.older_than``'s names).
    """
    oldest = keep_from(released_gen, keep)
    if oldest <= 1:
        return {}
    ranges = keys.older_than(oldest)
    taints = ranges.pop("taints")
    counts = dict(zip(ranges, client.delete_ranges(list(ranges.values()), what=f"prune before gen {oldest}")))
    counts["taints"] = _prune_taints(client, keys, taints, oldest)
    return counts


def _prune_taints(client: EtcdClient, keys: ClusterKeys, span: tuple[str, str], oldest: int) -> int:
    """Delete the taints in ``span`` written before generation ``oldest`` (or the first one after
    it) was released; each only if nobody wrote it again meanwhile."""
    first, _ = client.get_range(keys.released_of(oldest), prefix_end(keys.released), limit=1, keys_only=True)
    if not first:
        return 0
    released_at = first[0].mod_revision
    kvs, _ = client.get_range(*span, keys_only=True)
    deleted = 0
    for kv in kvs:
        if kv.mod_revision < released_at:
            ok, _ = client.transaction([Mod(kv.key) == kv.mod_revision], [Delete(kv.key)], what=f"prune {kv.key}")
            deleted += bool(ok)
    return deleted
