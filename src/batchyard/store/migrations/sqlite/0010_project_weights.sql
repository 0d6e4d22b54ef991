-- A project's weight in the fair share of workers and upstream slots (domain/fairshare.py): a project of weight 3
-- gets three times the share of one of weight 1 while both have work. Owners that are not projects weigh 1.
ALTER TABLE projects ADD COLUMN weight REAL NOT NULL DEFAULT 1.0;
