-- The blob of a deleted file has been removed (by the sweeper, once no live batch read it): it is not offered for
-- removal again.
ALTER TABLE files ADD COLUMN blob_removed BOOLEAN NOT NULL DEFAULT FALSE;
