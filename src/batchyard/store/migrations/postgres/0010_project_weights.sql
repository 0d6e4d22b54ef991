-- The PostgreSQL twin of migrations/sqlite/0010_project_weights.sql: a project's fair-share weight.
ALTER TABLE projects ADD COLUMN weight DOUBLE PRECISION NOT NULL DEFAULT 1.0;
