"""Retries stop when the deadline is near (docs/scheduling.md): a line whose upstream asks to retry later than the
batch's `expires_at` ends at once with that answer, instead of waiting into the expiry."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from tests.conftest import Server
from tests.support.batches import chat_line, upload, wait_for
from tests.support.fake_upstream import FakeUpstream


def test_a_retry_past_the_deadline_is_not_made(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server("--upstream", upstream.base_url)
    client = srv.client()
    too_late = chat_line(
        0, x_fake={"status": 503, "fail_times": 1, "retry_after": "30"}
    )  # the window is 20 s
    in_time = chat_line(1, x_fake={"status": 503, "fail_times": 1, "retry_after": "1"})
    fid = upload(client, [too_late, in_time])
    t0 = time.monotonic()
    b = client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="20s")  # type: ignore[arg-type]
    done = wait_for(client, b.id, timeout=30)
    took = time.monotonic() - t0
    assert done.status == "completed" and took < 15  # not expired: no line waited for its 30 s retry
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    assert done.error_file_id is not None and done.output_file_id is not None
    (err,) = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert err["custom_id"] == too_late["custom_id"]
    assert err["response"]["status_code"] == 503  # the line's last error: the upstream's answer
    (out,) = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert out["custom_id"] == in_time["custom_id"]  # retried after 1 s, well before the deadline
