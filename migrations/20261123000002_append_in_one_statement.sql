-- One-statement append: the writer's fast path, one round trip (plus the commit it rides on)
-- instead of four. The writer sends rows it has already numbered and hash-chained from the
-- head and stream versions it believes current; this takes the append lock, checks those
-- beliefs and inserts. False means a belief was stale (another writer appended): nothing is
-- written and the writer takes the general path, which reads under the lock.
--
-- Each statement of a volatile PL/pgSQL function takes a fresh snapshot (read committed), so
-- the reads below see every commit made while the lock was awaited.
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
    p_data         jsonb[],
    p_meta         integer[],     -- each row's metadata: an index into p_metadata
    p_recorded_at  timestamptz[],
    p_hash         bytea[],
    p_metadata     jsonb[]        -- one per request, not per row
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
    -- No rows (every request was a conflict): the beliefs are confirmed, nothing to write,
    -- and no statement to wake subscribers for nothing.
    IF cardinality(p_position) > 0 THEN
        -- An event id already in the log fails here (unique violation): the writer then
        -- probes ids on the general path.
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
