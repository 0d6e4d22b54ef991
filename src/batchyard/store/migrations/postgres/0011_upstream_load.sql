-- Each worker process's batch load per upstream (upstreams/online.py, MachineShares): what it wants (demand: lines
-- holding or waiting for a slot) and has in flight, refreshed every second and live until expires_at (the store's
-- clock). Workers on different machines read each other's rows to share each upstream's concurrency limit; the
-- processes of one machine share it on that machine's board. Independent of the other migrations.
CREATE TABLE upstream_load (
    holder      TEXT NOT NULL,
    upstream    TEXT NOT NULL,
    machine     TEXT NOT NULL,
    demand      INTEGER NOT NULL,
    in_flight   INTEGER NOT NULL,
    expires_at  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (holder, upstream)
);
