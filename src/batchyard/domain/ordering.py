"""Prefix-aware ordering: dispatch together the requests that share a prompt prefix.

Servers with prefix caching (vLLM, SGLang) keep the KV cache of recent prompts; requests that start with the same
system prompt and first messages reuse it when they run close together. Sorting a shard's requests by their prompt
text (model first) puts requests with a common prefix next to each other, longest shared prefixes closest. The sort
is stable, so requests with equal keys keep their file order.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

KEY_CHARS = 4096
_MAX_PARTS_DEPTH = 4


def _text(value: Any, depth: int = 0) -> str:
    """The text of a prompt, content, or list of content parts; nesting beyond a few levels holds no prompt text
    a server would cache (and is a tenant's to make as deep as it likes): it is not walked."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and depth < _MAX_PARTS_DEPTH:  # content parts, or a list of prompts
        return "".join(_text(v.get("text", "") if isinstance(v, dict) else v, depth + 1) for v in value)
    return ""


def prefix_key(body: dict[str, Any]) -> tuple[str, ...]:
    """What a request's prompt starts with, as pieces compared in turn: its model, its instructions or prompt, then
    each message's role and text, KEY_CHARS of text in all. The pieces are the request's own strings (cut only
    past the bound), so sorting a shard copies no prompt (a key joined into one text made a fresh 4 KB string a
    line for 4 KB prompts). Sorting and grouping a shard of the P1 file, fresh from the parser: 2.3-2.8 us a
    line before, 1.4-1.6 with this key and `group_hash` in the scheduler (`python bench/ordering_cpu.py`)."""
    key: list[str] = [str(body.get("model", ""))]
    budget = KEY_CHARS
    for field in ("instructions", "input", "prompt"):
        if field in body and not isinstance(body.get(field), list | dict):
            text = _text(body.get(field))[:budget]
            key.append(text)
            budget -= len(text)
    for m in _messages(body):
        if budget <= 0:
            break
        if isinstance(m, dict):
            role = m.get("role", "")
            role = (role if isinstance(role, str) else str(role))[:64]
            text = _text(m.get("content"))[:budget]
            key += (role, text)
            budget -= len(role) + len(text) + 16  # 16 at least a message: thousands of empty ones end it
    return tuple(key)


def _messages(body: dict[str, Any]) -> list[Any]:
    """The conversation: chat `messages`, or a responses `input` list."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        inp = body.get("input")
        messages = inp if isinstance(inp, list) else []
    return messages


def _joined(parts: list[str], messages: list[Any]) -> str:
    """`parts` and each message's role and text, bounded to KEY_CHARS."""
    size = 0
    for m in messages:
        if size > KEY_CHARS:
            break
        if isinstance(m, dict):
            piece = f"{m.get('role', '')}:{_text(m.get('content'))}\x1e"
            parts.append(piece)
            size += len(piece)
    return "\x00".join(parts)[:KEY_CHARS]


def prefix_order(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Requests (parsed input lines) reordered so that shared prompt prefixes are adjacent."""
    return sorted(requests, key=lambda r: prefix_key(r.get("body") or {}))


def group_key(body: dict[str, Any]) -> str | None:
    """What requests of one prefix group share: the model, the instructions and every message but the last (the
    system prompt and the conversation so far). None when a request has nothing before its own last message: it
    shares no context a server could cache for another line."""
    messages = _messages(body)
    instructions = body.get("instructions")
    if len(messages) < 2 and not isinstance(instructions, str):
        return None
    parts = [str(body.get("model", "")), instructions if isinstance(instructions, str) else ""]
    return _joined(parts, messages[:-1])


def group_hash(body: dict[str, Any]) -> int | None:
    """A hash of what `group_key` describes, without building its text (the validator asks it of every line):
    the model, the instructions and every message's role and content but the last. Content given as a list of
    parts (unhashable) falls back to `group_key`'s text."""
    messages = body.get("messages")
    if (
        type(messages) is list and len(messages) == 2 and "instructions" not in body
    ):  # a system prompt + a question
        m = messages[0]
        if type(m) is dict:
            role, content = m.get("role"), m.get("content")
            if role is not None and type(content) is str:  # the same tuple as below, built in half the time
                return hash((body.get("model"), None, (role, content)))
    if type(messages) is not list:
        inp = body.get("input")
        messages = inp if type(inp) is list else []
    instructions = body.get("instructions")
    if len(messages) < 2 and type(instructions) is not str:
        return None
    try:
        context = [(m["role"], m["content"]) for m in messages[:-1]]
        return hash((body.get("model"), instructions if type(instructions) is str else None, *context))
    except (TypeError, KeyError):  # content parts, a message that is not an object, a missing role
        key = group_key(body)
        return None if key is None else hash(key)


class _Group:
    __slots__ = ("key", "lines", "warm")

    def __init__(self, key: int) -> None:
        self.key = key  # its group_hash
        self.lines: list[Any] = []  # in dispatch order, reversed when planning ends (pop from the end)
        self.warm = False  # its first line has come back: its prefix is in the server's cache


class Prefixes:
    """The prefix groups a worker process's shards are prefilling or have prefilled, shared by their schedulers.

    A group's lines can sit in several shards that run at the same time (a large group fills several shards); only
    one of them sends the group's first line, the others wait for it to come back. Warm entries are forgotten after
    `ttl` seconds (an engine's cache moves on) or beyond `size` entries; a prefill in flight after `stale` seconds
    (its shard stalled or died without saying so) no longer holds anyone back. Keys are `group_hash`es."""

    def __init__(
        self,
        size: int = 4096,
        ttl: float = 600.0,
        stale: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._size, self._ttl, self._stale, self._clock = size, ttl, stale, clock
        self._warm: OrderedDict[int, float] = OrderedDict()  # key -> when it came back
        self._warming: dict[int, float] = {}  # key -> when its first line left

    def state(self, key: int) -> str:
        """ "warm", "warming" or "cold"."""
        now = self._clock()
        since = self._warm.get(key)
        if since is not None:
            if now - since <= self._ttl:
                return "warm"
            del self._warm[key]
        started = self._warming.get(key)
        if started is not None:
            if now - started <= self._stale:
                return "warming"
            del self._warming[key]
        return "cold"

    def start(self, key: int) -> None:
        self._warming[key] = self._clock()

    def warmed(self, key: int) -> None:
        self._warming.pop(key, None)
        self._warm[key] = self._clock()
        self._warm.move_to_end(key)
        while len(self._warm) > self._size:
            self._warm.popitem(last=False)

    def abandon(self, key: int) -> None:
        """A first line in flight will not come back (its attempt ended): the group is cold again."""
        self._warming.pop(key, None)


WAIT = object()  # `Scheduler.take`: nothing can be sent now, but lines remain (a group's first is in flight)


class Scheduler(Protocol):
    """Which line a lane sends next (the shard runner's lanes share one per shard attempt)."""

    def take(self, lane: int) -> Any: ...
    def done(self, lane: int, req: Any) -> bool: ...
    def leave(self, lane: int) -> None: ...
    def drain(self) -> None: ...
    def close(self) -> None: ...


class FileOrder:
    """Lines in the order given, to whichever lane asks (no prefix ordering)."""

    def __init__(self, requests: list[dict[str, Any]]) -> None:
        self._todo = iter(requests)

    def take(self, lane: int) -> Any:
        return next(self._todo, None)

    def done(self, lane: int, req: Any) -> bool:
        return False

    def leave(self, lane: int) -> None:
        pass

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


class PrefixScheduler:
    """Which line a lane sends next, so that a server's prefix cache is filled once per group and then reused.

    A server such as llama.cpp caches a prompt only once a request has finished prefilling it, and its slots do not
    share a prefill in progress: lines of one group sent side by side each pay the whole prefill. So:
    - a group's first line goes alone; the rest of the group waits until it came back (`done`);
    - a lane keeps to its group (its "home") while the group has lines, so the slot that holds the prefix serves the
      group, and the next lane to need work starts the next group's first line;
    - only when no group is left to start does a lane join another warm group (the one with most lines left), and
      only when every remaining line waits on a first line in flight does a lane wait (`WAIT`);
    - lines that share nothing (`group_key` None) are sent in order whenever a lane has nothing better.
    - with a shared `Prefixes`, a group another shard of the process has prefilled starts warm, and one whose first
      line another shard has in flight waits for it (`done` there opens it here; the caller wakes the lanes).
    `drain()` lifts the holds (the batch stopped: remaining lines are not sent, only recorded); `close()` gives
    back the first lines still in flight. No I/O; the shard runner calls it from its lanes."""

    def __init__(self, requests: list[dict[str, Any]], shared: Prefixes | None = None) -> None:
        self._shared = shared if shared is not None else Prefixes(size=0)
        groups: dict[int, _Group] = {}
        self._order: list[_Group] = []
        self._free: list[Any] = []
        for req in requests:
            body = req.get("body")
            key = group_hash(body) if isinstance(body, dict) else None  # as the validator plans shards
            if key is None:
                self._free.append(req)
                continue
            g = groups.get(key)
            if g is None:
                g = groups[key] = _Group(key)
                self._order.append(g)
            g.lines.append(req)
        for g in self._order:
            if len(g.lines) == 1:  # a group of one shares nothing: no reason to hold anything for it
                self._free.append(g.lines[0])
        self._order = [g for g in self._order if len(g.lines) > 1]
        for g in self._order:
            g.lines.reverse()
        self._free.reverse()
        self._next_cold = 0
        self._elsewhere: list[_Group] = []  # groups whose first line another shard has in flight
        self._home: dict[int, _Group] = {}
        self._group_of: dict[int, _Group] = {}  # id(first line) -> its group, until it is done
        self._draining = False

    def drain(self) -> None:
        self._draining = True

    def take(self, lane: int) -> Any:
        """The next line for `lane`, WAIT, or None when every line has been taken."""
        home = self._home.get(lane)
        if home is not None and home.lines and (home.warm or self._draining):
            return home.lines.pop()
        if self._elsewhere:
            self._opened_elsewhere()
        while self._next_cold < len(self._order):  # start the next group: its first line goes alone
            g = self._order[self._next_cold]
            self._next_cold += 1
            if not g.lines:
                continue
            state = self._shared.state(g.key)
            if state == "warm":  # prefilled by another shard: no line of it is held back
                g.warm = True
                self._home[lane] = g
                return g.lines.pop()
            if state == "warming" and not self._draining:
                self._elsewhere.append(g)
                continue
            if g.lines:
                self._shared.start(g.key)
                first = g.lines.pop()
                self._group_of[id(first)] = g
                self._home[lane] = g
                return first
        if self._free:
            return self._free.pop()
        open_groups = [g for g in self._order if g.lines and (g.warm or self._draining)]
        if open_groups:
            g = max(open_groups, key=lambda x: len(x.lines))
            self._home[lane] = g
            return g.lines.pop()
        if self._elsewhere or any(g.lines for g in self._order):
            return WAIT
        return None

    def done(self, lane: int, req: Any) -> bool:
        """`lane` finished `req` (whatever its outcome). True when that opened a group: waiting lanes may go on."""
        g = self._group_of.pop(id(req), None)
        if g is None:
            return False
        g.warm = True
        self._shared.warmed(g.key)
        return True  # lanes of other shards may wait for this group too

    def _opened_elsewhere(self) -> None:
        """Groups whose first line another shard had in flight: open now if it came back, cold again (started
        here) if that shard gave it up."""
        still = []
        for g in self._elsewhere:
            state = self._shared.state(g.key)
            if state == "warm" or self._draining:
                g.warm = True
            elif state == "cold":
                self._order.append(g)  # started by the cold loop, first line alone
            else:
                still.append(g)
        self._elsewhere = still

    def close(self) -> None:
        """The attempt ended: first lines still in flight will not come back from here."""
        for g in self._group_of.values():
            self._shared.abandon(g.key)
        self._group_of.clear()

    def leave(self, lane: int) -> None:
        """A lane retired: its home is free for others."""
        self._home.pop(lane, None)
