-- The log keeps the canonical JSON text its hash chain covers, as `json` (stored as sent),
-- instead of `jsonb` (parsed into a binary tree on every insert, printed back with its own
-- key order and spacing). Parsing jsonb was a third of Postgres's work per appended event;
-- `json` only checks the text is JSON. An auditor can hash a row's columns with no JSON
-- canonicalizer, and the log's rows are smaller.
--
-- Queries on the log still work (`->`, `->>`, `::jsonb`); indexable queries belong to the
-- read models, which keep their own tables. Rows written before keep jsonb's text; verify-log
-- canonicalizes whatever text it reads, so their hashes still check.

ALTER TABLE events
    ALTER COLUMN data TYPE json USING data::json,
    ALTER COLUMN metadata DROP DEFAULT,
    ALTER COLUMN metadata TYPE json USING metadata::json,
    ALTER COLUMN metadata SET DEFAULT '{}'::json;

DROP FUNCTION sluice_append_at(bigint, bigint, bytea, text[], bigint[], bigint[], uuid[], text[], bigint[], text[],
                               smallint[], jsonb[], integer[], timestamptz[], bytea[], jsonb[]);

-- As in 20261123000002, with json rows.
CREATE FUNCTION sluice_append_at(
    lock_key       bigint,
    expected_head  bigint,   -- NULL: the log is empty
    expected_hash  bytea,
    check_streams  text[],
    check_versions bigint[], -- each stream's last version before these rows; NULL: no stream
    p_position     bigint[],
    p_event_id     uuid[],
    p_stream       text[],
    p_version      bigint[],
    p_type         text[],
    p_type_version smallint[],
    p_data         json[],
    p_meta         integer[],     -- each row's metadata: an index into p_metadata
    p_recorded_at  timestamptz[],
    p_hash         bytea[],
    p_metadata     json[]         -- one per request, not per row
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    head_position bigint;
    head_hash     bytea;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    SELECT position, hash INTO head_position, head_hash FROM events ORDER BY position DESC LIMIT 1;
    IF head_position IS DISTINCT FROM expected_head OR head_hash IS DISTINCT FROM expected_hash THEN
        RETURN false;
    END IF;
    IF EXISTS (
        SELECT 1 FROM unnest(check_streams, check_versions) AS s(stream, version)
        WHERE s.version IS DISTINCT FROM
              (SELECT e.version FROM events e WHERE e.stream = s.stream ORDER BY e.version DESC LIMIT 1)
    ) THEN
        RETURN false;
    END IF;
    IF cardinality(p_position) > 0 THEN
        INSERT INTO events (position, event_id, stream, version, type, type_version, data, metadata, recorded_at, hash)
        SELECT r.position, r.event_id, r.stream, r.version, r.type, r.type_version, r.data,
               p_metadata[r.meta], r.recorded_at, r.hash
        FROM unnest(p_position, p_event_id, p_stream, p_version, p_type, p_type_version,
                    p_data, p_meta, p_recorded_at, p_hash)
             AS r(position, event_id, stream, version, type, type_version, data, meta, recorded_at, hash);
    END IF;
    RETURN true;
END;
$$;
