"""Weighted fair share across owners (projects), pure.

Three places apply it, each with the same weights (a project's `weight`, 1 for an owner that is no project):
- the claim (`store/sql.py: claim_order`, and the memory store): whichever worker claims, the owner with the
  fewest running shards per unit of weight goes first, then within an owner the batch with the fewest running
  shards, the earliest deadline (`expires_at`), the oldest;
- a worker's lanes (`lane_shares`): the shards running in one process share the upstreams' concurrency by their
  owners' weights, not one equal share per shard (a project with 9 shards here does not get 9 times the slots of
  a project with 1);
- an upstream's limiter (upstreams/fairqueue.py): lanes waiting for a slot are served in weighted fair order by
  owner, not first come first served.
"""

from __future__ import annotations

from collections.abc import Sequence

MIN_WEIGHT = 0.01
MAX_WEIGHT = 1000.0


def weight_problem(weight: float) -> str | None:
    """Why `weight` cannot be a project's weight, or None."""
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:  # NaN fails too
        return f"a weight is a number from {MIN_WEIGHT} to {MAX_WEIGHT:g}"
    return None


def lane_shares(total: int, shards: Sequence[tuple[str, float]]) -> list[int]:
    """Lanes for each running shard, given as (owner, weight) in the order they started.

    Each owner gets its weighted share of `total` (largest remainders first, the owner that started first on a
    tie), split equally among its shards (the earlier ones get the remainder); every shard gets at least one lane.
    The lanes add up to `total` while every owner has at least as many lanes as shards. An owner with more shards
    here than its share gets one lane per shard, so the lanes then outnumber the slots: the limiter's fair queue
    (upstreams/fairqueue.py) still serves the owners by weight, and the shards of that owner take turns."""
    if not shards:
        return []
    weights: dict[str, float] = {}
    count: dict[str, int] = {}
    for owner, weight in shards:
        weights[owner] = weight if weight > 0 else 1.0
        count[owner] = count.get(owner, 0) + 1
    total_weight = sum(weights.values())
    ideal = {o: total * w / total_weight for o, w in weights.items()}
    share = {o: int(x) for o, x in ideal.items()}
    order = list(weights)  # owners in the order their first shard started
    left = total - sum(share.values())
    for o in sorted(order, key=lambda o: (-(ideal[o] - share[o]), order.index(o)))[: max(0, left)]:
        share[o] += 1
    lanes: list[int] = []
    rank: dict[str, int] = {}
    for owner, _ in shards:
        mine, k = max(share[owner], count[owner]), count[owner]
        r = rank[owner] = rank.get(owner, -1) + 1
        lanes.append(mine // k + (1 if r < mine % k else 0))
    return lanes
