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
    """Lanes for each running shard, given as (owner, weight) in the order they started: every shard gets one,
    and the rest of `total` goes to owners by weight and, within an owner, equally to its shards (largest
    remainders first, the earlier shard on a tie). The shares add up to `total` when it is at least the number of
    shards; otherwise every shard gets one lane."""
    n = len(shards)
    if n == 0:
        return []
    spare = max(0, total - n)
    owner_weight: dict[str, float] = {}
    owner_shards: dict[str, int] = {}
    for owner, weight in shards:
        owner_weight[owner] = weight if weight > 0 else 1.0
        owner_shards[owner] = owner_shards.get(owner, 0) + 1
    total_weight = sum(owner_weight.values())
    ideal = [spare * owner_weight[o] / total_weight / owner_shards[o] for o, _ in shards]
    lanes = [1 + int(x) for x in ideal]
    left = total - sum(lanes)
    by_remainder = sorted(range(n), key=lambda i: (-(ideal[i] - int(ideal[i])), i))
    for i in by_remainder[: max(0, left)]:
        lanes[i] += 1
    return lanes
