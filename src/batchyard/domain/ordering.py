"""Prefix-aware ordering: dispatch together the requests that share a prompt prefix.

Servers with prefix caching (vLLM, SGLang) keep the KV cache of recent prompts; requests that start with the same
system prompt and first messages reuse it when they run close together. Sorting a shard's requests by their prompt
text (model first) puts requests with a common prefix next to each other, longest shared prefixes closest. The sort
is stable, so requests with equal keys keep their file order.
"""

from __future__ import annotations

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


def prefix_key(body: dict[str, Any]) -> str:
    """The text a request's prompt starts with (bounded), prefixed by its model."""
    parts: list[str] = [str(body.get("model", ""))]
    for field in ("instructions", "input", "prompt"):
        if field in body and not isinstance(body.get(field), list | dict):
            parts.append(_text(body.get(field)))
    return _joined(parts, _messages(body))


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


class _Group:
    __slots__ = ("lines", "warm")

    def __init__(self) -> None:
        self.lines: list[Any] = []  # in dispatch order, reversed when planning ends (pop from the end)
        self.warm = False  # its first line has come back: its prefix is in the server's cache


WAIT = object()  # `Scheduler.take`: nothing can be sent now, but lines remain (a group's first is in flight)


class Scheduler(Protocol):
    """Which line a lane sends next (the shard runner's lanes share one per shard attempt)."""

    def take(self, lane: int) -> Any: ...
    def done(self, lane: int, req: Any) -> bool: ...
    def leave(self, lane: int) -> None: ...
    def drain(self) -> None: ...


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
    `drain()` lifts the holds (the batch stopped: remaining lines are not sent, only recorded). Pure: no I/O, no
    clock; the shard runner calls it from its lanes."""

    def __init__(self, requests: list[dict[str, Any]]) -> None:
        groups: dict[str, _Group] = {}
        self._order: list[_Group] = []
        self._free: list[Any] = []
        for req in requests:
            body = req.get("body")
            key = group_key(body) if isinstance(body, dict) else None
            if key is None:
                self._free.append(req)
                continue
            g = groups.get(key)
            if g is None:
                g = groups[key] = _Group()
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
        while self._next_cold < len(self._order):  # start the next group: its first line goes alone
            g = self._order[self._next_cold]
            self._next_cold += 1
            if g.lines:
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
        if any(g.lines for g in self._order):
            return WAIT
        return None

    def done(self, lane: int, req: Any) -> bool:
        """`lane` finished `req` (whatever its outcome). True when that opened a group: waiting lanes may go on."""
        g = self._group_of.pop(id(req), None)
        if g is None:
            return False
        g.warm = True
        return bool(g.lines)

    def leave(self, lane: int) -> None:
        """A lane retired: its home is free for others."""
        self._home.pop(lane, None)
