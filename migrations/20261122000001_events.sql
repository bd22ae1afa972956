-- The log: the only truth. Append-only, gap-free, hash-chained.
-- Never edit this file once landed; add a new migration instead.

CREATE TABLE events (
    -- Assigned by the writer under one transaction-scoped advisory lock as head + 1, so it is
    -- gap-free and in commit order (a sequence would leave gaps on rollback).
    position      bigint      PRIMARY KEY CHECK (position > 0),
    event_id      uuid        NOT NULL UNIQUE,
    stream        text        NOT NULL CHECK (length(stream) BETWEEN 1 AND 300),
    version       bigint      NOT NULL CHECK (version >= 0),
    type          text        NOT NULL,
    type_version  smallint    NOT NULL DEFAULT 1,
    data          jsonb       NOT NULL,
    metadata      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at   timestamptz NOT NULL,
    -- sha256(previous hash || canonical event); see sluice_events::event::canonical_bytes.
    hash          bytea       NOT NULL CHECK (length(hash) = 32),
    UNIQUE (stream, version)
);

-- No index beyond the three the invariants need: every extra index is paid on each append.
-- Read models (decisions, audit queries) keep their own tables and indexes.

-- Invariant 1: append-only. UPDATE, DELETE and TRUNCATE are refused for every role,
-- including the owner (a superuser could still drop the trigger: verify-log catches that).
CREATE FUNCTION sluice_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'sluice: the events table is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER events_no_update_delete
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION sluice_events_append_only();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_events_append_only();

-- Wake subscribers once per appending statement; they then read from their last position,
-- so a lost or coalesced notification never loses an event.
CREATE FUNCTION sluice_events_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sluice_events', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_events_notify();
