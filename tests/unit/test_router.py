"""Model routing: exact names beat globs, globs beat the catch-all."""

from __future__ import annotations

from batchyard.upstreams.base import Upstream, UpstreamResponse
from batchyard.upstreams.limiter import AdaptiveLimiter, Limiter
from batchyard.upstreams.pool import Member
from batchyard.upstreams.router import Router


class Named(Upstream):
    def __init__(self, name: str) -> None:
        self.name = name

    async def call(self, endpoint: str, body: bytes, *, timeout: float) -> UpstreamResponse:
        raise AssertionError("routing never calls an upstream")

    def __repr__(self) -> str:
        return f"Named({self.name!r})"


A, B, C, D = Named("a"), Named("b"), Named("c"), Named("d")


def served_by(router: Router, model: str) -> list[Upstream] | None:
    """The upstreams of the group that serves `model`, in order (the dispatcher balances between them)."""
    group = router.group(model)
    return None if group is None else [m.upstream for m in group]


def test_exact_beats_glob_beats_catch_all() -> None:
    router = Router([(None, C), ("gpt-*", B), ("gpt-4o", A)])
    assert served_by(router, "gpt-4o") == [A]
    assert served_by(router, "gpt-4o-mini") == [B]
    assert served_by(router, "llama") == [C]


def test_no_catch_all_means_unroutable() -> None:
    router = Router([("gpt-4o", A), ("llama-*", B)])
    assert served_by(router, "mistral") is None
    assert not router.is_routable("mistral")
    assert router.is_routable("gpt-4o")
    assert router.is_routable("llama-3")


def test_empty_router_routes_nothing() -> None:
    router = Router([])
    assert served_by(router, "anything") is None
    assert router.upstreams == []
    assert router.model_names() == []


def test_star_is_the_catch_all() -> None:
    router = Router([("*", A), ("x", B)])
    assert served_by(router, "anything") == [A]
    assert served_by(router, "x") == [B]
    assert router.model_names() == ["x"]


def test_first_catch_all_wins() -> None:
    assert served_by(Router([(None, A), ("*", B), (None, C)]), "m") == [A, B, C]  # one group, first first


def test_first_exact_route_wins() -> None:
    assert served_by(Router([("m", A), ("m", B)]), "m") == [A, B]  # one group, first first


def test_globs_are_tried_in_order() -> None:
    router = Router([("llama-3*", A), ("llama-*", B)])
    assert served_by(router, "llama-3.1-8b") == [A]
    assert served_by(router, "llama-2-7b") == [B]


def test_glob_syntax() -> None:
    router = Router([("model-?", A), ("[xy]-large", B)])
    assert served_by(router, "model-1") == [A]
    assert served_by(router, "model-12") is None
    assert served_by(router, "x-large") == [B]
    assert served_by(router, "z-large") is None


def test_matching_is_case_sensitive() -> None:
    router = Router([("GPT-4o", A), ("llama-*", B)])
    assert served_by(router, "gpt-4o") is None
    assert served_by(router, "LLAMA-3") is None


def test_glob_matches_whole_name() -> None:
    router = Router([("gpt-*", A)])
    assert served_by(router, "my-gpt-4") is None


def test_names_with_slashes() -> None:
    router = Router([("meta-llama/*", A)])
    assert served_by(router, "meta-llama/Llama-3.1-8B-Instruct") == [A]


def test_upstreams_are_deduplicated() -> None:
    router = Router([("a", A), ("b", A), ("c-*", B), (None, A), ("d", D)])
    ups = router.upstreams
    assert len(ups) == 3
    assert {u.name for u in ups} == {"a", "b", "d"}


def test_each_upstream_is_one_member_with_its_own_limiter_made_with_the_router() -> None:
    made: list[Limiter] = []

    def limiter() -> Limiter:
        made.append(Limiter(3))
        return made[-1]

    own = Member(B, Limiter(7))
    router = Router([("a", A), ("b", A), (None, own), ("c", C)], limiter=limiter)
    assert [(m.upstream, m.limiter.limit) for m in router.members] == [(A, 3), (C, 3), (B, 7)]
    assert len(made) == 2  # A named twice: one member, one limiter
    group_a, group_b = router.group("a"), router.group("b")
    assert group_a is not None and group_b is not None and group_a[0] is group_b[0]
    assert served_by(router, "other") == [B] and router.group("other") == [own]


def test_the_default_limiter_is_adaptive() -> None:
    (member,) = Router([(None, A)]).members
    assert isinstance(member.limiter, AdaptiveLimiter)


def test_model_names_are_the_sorted_exact_names() -> None:
    router = Router([("zeta", A), ("alpha", B), ("g-*", C), (None, D)])
    assert router.model_names() == ["alpha", "zeta"]


class Listing(Named):
    """An upstream whose /v1/models lists `ids` (None: it cannot say)."""

    def __init__(self, name: str, ids: list[str] | None) -> None:
        super().__init__(name)
        self.ids = ids
        self.asked = 0

    async def list_models(self, *, timeout: float) -> list[str] | None:
        self.asked += 1
        return self.ids


async def test_list_models_adds_what_glob_and_catch_all_upstreams_list() -> None:
    gpt = Listing("gpt", ["gpt-4o", "gpt-4o-mini", "llama-3"])
    rest = Listing("rest", ["mistral", "gpt-4o"])
    silent = Listing("silent", None)
    router = Router([("exact-model", A), ("gpt-*", gpt), ("gpt-*", silent), (None, rest)])
    # llama-3 is listed by the gpt-* upstream but does not match its glob; the catch-all's ids are all routable
    assert await router.list_models() == ["exact-model", "gpt-4o", "gpt-4o-mini", "mistral"]
    await router.list_models()
    assert (gpt.asked, rest.asked, silent.asked) == (1, 1, 1)  # cached for a minute
    await router.list_models(ttl=0)
    assert gpt.asked == 2
