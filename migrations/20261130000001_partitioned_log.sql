-- The log, partitioned by position ranges (issue #19, "a log that stays bounded"): an old range
-- is archived by writing its rows to a verifiable segment file and detaching its partition,
-- never by a DELETE. `sluice-control archive` does it; docs/operations.md says how.
--
-- A partitioned table cannot hold a unique index without the partition key, so the two
-- uniqueness rules of the log are kept per partition by its own unique indexes and across
-- partitions by the append path (which runs under the append lock): an event id or a
-- (stream, version) an older partition or the archive holds is refused (SQLSTATE 23505, as
-- the indexes did: `sluice_check_new_rows`), and a stream's version follows its last version
-- in the live partitions or, once those were archived, in `archived_stream_heads`.

-- Rows per partition. Fixed per partition when it is created; a test may lower it first.
CREATE TABLE log_settings (
    one            boolean PRIMARY KEY DEFAULT true CHECK (one),
    partition_size bigint  NOT NULL CHECK (partition_size > 0)
);
INSERT INTO log_settings (partition_size) VALUES (1000000);

-- Every partition made, live or archived: [from_position, to_position).
CREATE TABLE log_partitions (
    name          text   PRIMARY KEY,
    from_position bigint NOT NULL UNIQUE,
    to_position   bigint NOT NULL CHECK (to_position > from_position),
    archived      boolean NOT NULL DEFAULT false
);

-- Archived ranges: the segment file and what proves it (its digest, the chain hash before its
-- first row and after its last row, the signed anchor of that last hash).
CREATE TABLE log_archives (
    first_position bigint      PRIMARY KEY,
    last_position  bigint      NOT NULL UNIQUE,
    prev_hash      bytea       NOT NULL CHECK (length(prev_hash) = 32),
    last_hash      bytea       NOT NULL CHECK (length(last_hash) = 32),
    events         bigint      NOT NULL,
    segment        text        NOT NULL,
    segment_sha256 bytea       NOT NULL CHECK (length(segment_sha256) = 32),
    bytes          bigint      NOT NULL,
    anchor         text        NOT NULL,
    archived_at    timestamptz NOT NULL DEFAULT now()
);

-- The last version of every stream whose newest event is archived.
CREATE TABLE archived_stream_heads (
    stream   text   PRIMARY KEY,
    version  bigint NOT NULL,
    position bigint NOT NULL
);

ALTER TABLE events RENAME TO events_legacy;
DROP TRIGGER events_no_update_delete ON events_legacy;
DROP TRIGGER events_no_truncate ON events_legacy;
DROP TRIGGER events_notify ON events_legacy;

CREATE TABLE events (LIKE events_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS) PARTITION BY RANGE (position);
ALTER TABLE events ADD PRIMARY KEY (position);
-- Each partition has its own unique indexes on event_id and (stream, version) (the old table
-- keeps its own): an insert is checked against its partition for free, and only the older
-- live partitions need a probe (sluice_check_new_rows).

CREATE TRIGGER events_no_update_delete
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION sluice_events_append_only();
CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_events_append_only();
CREATE TRIGGER events_notify
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_events_notify();

-- The rows written so far stay where they are: the old table becomes the first partition,
-- its range rounded up to whole partitions.
DO $$
DECLARE
    head bigint;
    size bigint;
    top  bigint;
BEGIN
    SELECT max(position) INTO head FROM events_legacy;
    IF head IS NULL THEN
        DROP TABLE events_legacy;
        RETURN;
    END IF;
    SELECT partition_size INTO size FROM log_settings;
    top := ((head - 1) / size + 1) * size + 1;
    EXECUTE format('ALTER TABLE events ATTACH PARTITION events_legacy FOR VALUES FROM (1) TO (%s)', top);
    CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events_legacy
        FOR EACH STATEMENT EXECUTE FUNCTION sluice_events_append_only();
    INSERT INTO log_partitions (name, from_position, to_position) VALUES ('events_legacy', 1, top);
END;
$$;

-- Makes the partitions up to `upto` (a position about to be written). Called under the append
-- lock; the fast path is one read of a small table.
CREATE FUNCTION sluice_ensure_partition(upto bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    top  bigint;
    size bigint;
    name text;
BEGIN
    SELECT coalesce(max(to_position), 1) INTO top FROM log_partitions;
    IF upto < top THEN
        RETURN;
    END IF;
    SELECT partition_size INTO size FROM log_settings;
    WHILE top <= upto LOOP
        name := 'events_' || lpad(top::text, 15, '0');
        EXECUTE format('CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%s) TO (%s)', name, top, top + size);
        EXECUTE format('CREATE UNIQUE INDEX ON %I (event_id)', name);
        EXECUTE format('CREATE UNIQUE INDEX ON %I (stream, version)', name);
        EXECUTE format('CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON %I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION sluice_events_append_only()', name);
        INSERT INTO log_partitions (name, from_position, to_position) VALUES (name, top, top + size);
        top := top + size;
    END LOOP;
END;
$$;

-- A stream's last version: in the live log, else where its archived events left it.
CREATE FUNCTION sluice_stream_version(s text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT e.version FROM events e WHERE e.stream = s ORDER BY e.version DESC LIMIT 1),
        (SELECT a.version FROM archived_stream_heads a WHERE a.stream = s)
    );
$$;

-- Makes the partition for `upto` (the last position about to be written), then refuses
-- (SQLSTATE 23505, as the unique indexes of one table did) rows whose event id or (stream,
-- version) an older live partition or the archive already holds; the partition the rows go
-- to checks them itself with its unique indexes. `verified` names streams whose last version
-- the caller has just checked exactly (sluice_append_at's `check_streams`).
CREATE FUNCTION sluice_check_new_rows(ids uuid[], streams text[], versions bigint[], verified text[], upto bigint)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    below bigint;
BEGIN
    PERFORM sluice_ensure_partition(upto);
    SELECT from_position INTO below FROM log_partitions
    WHERE from_position <= upto ORDER BY from_position DESC LIMIT 1;
    IF NOT EXISTS (SELECT 1 FROM log_partitions WHERE NOT archived AND from_position < below)
       AND NOT EXISTS (SELECT 1 FROM log_archives) THEN
        RETURN;
    END IF;
    -- LATERAL ... LIMIT 1 forces one index probe per row whatever plan the cached plan settles
    -- on (a semi-join drifted to sequential scans as the partitions grew); `position < below`
    -- leaves the newest partition out at run time.
    IF EXISTS (
        SELECT 1 FROM unnest(ids) AS k(id)
        CROSS JOIN LATERAL (SELECT 1 FROM events e WHERE e.event_id = k.id AND e.position < below LIMIT 1) AS hit
    ) THEN
        RAISE EXCEPTION 'sluice: an event id is already in the log' USING ERRCODE = 'unique_violation';
    END IF;
    -- A stream's versions are 0..its last, without a gap (the writer numbers them so), so a
    -- batch collides with an older partition exactly when one holds a version at or above the
    -- batch's first for that stream: one look per stream, not per row.
    IF EXISTS (
        SELECT 1 FROM (
            SELECT r.stream, min(r.version) AS first
            FROM unnest(streams, versions) AS r(stream, version)
            WHERE NOT (r.stream = ANY(verified))
            GROUP BY r.stream
        ) AS b
        WHERE EXISTS (
            SELECT 1 FROM events e
            WHERE e.stream = b.stream AND e.version >= b.first AND e.position < below
        ) OR EXISTS (
            SELECT 1 FROM archived_stream_heads a WHERE a.stream = b.stream AND a.version >= b.first
        )
    ) THEN
        RAISE EXCEPTION 'sluice: a stream version is already in the log' USING ERRCODE = 'unique_violation';
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION sluice_append_at(
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
    IF head_position IS NULL THEN
        SELECT last_position, last_hash INTO head_position, head_hash
        FROM log_archives ORDER BY last_position DESC LIMIT 1;
    END IF;
    IF head_position IS DISTINCT FROM expected_head OR head_hash IS DISTINCT FROM expected_hash THEN
        RETURN false;
    END IF;
    IF EXISTS (
        SELECT 1 FROM unnest(check_streams, check_versions) AS s(stream, version)
        WHERE s.version IS DISTINCT FROM sluice_stream_version(s.stream)
    ) THEN
        RETURN false;
    END IF;
    IF cardinality(p_position) > 0 THEN
        PERFORM sluice_check_new_rows(p_event_id, p_stream, p_version, check_streams, p_position[cardinality(p_position)]);
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
