-- A project's weight in the fair share of workers and upstream slots (domain/fairshare.py): a project of weight 3
-- gets three times the share of one of weight 1 while both have work. Owners that are not projects weigh 1.
ALTER TABLE projects ADD COLUMN weight REAL NOT NULL DEFAULT 1.0;
-- When a shard's attempt started and when the shard was done: the throughput admission control measures
-- (domain/admission.py) is the lines of shards done lately over the time since the first of them started.
ALTER TABLE shards ADD COLUMN started_at REAL;
ALTER TABLE shards ADD COLUMN done_at REAL;
CREATE INDEX shards_done ON shards (done_at);
