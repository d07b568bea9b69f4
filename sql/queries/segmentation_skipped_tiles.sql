-- Tiles E5 did not count, per donor, with the reason.
SELECT donor_id, file, reason FROM skipped_tiles ORDER BY donor_id, file;
