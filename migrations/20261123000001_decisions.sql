-- Read models beside the log (rebuildable from it at any time; the log stays the truth).

-- Where each read model has got to in the log.
CREATE TABLE projection_checkpoints (
    name     text   PRIMARY KEY,
    position bigint NOT NULL
);

-- Every AccessDecided event, flattened and indexed for audit queries.
CREATE TABLE decisions (
    id             uuid        PRIMARY KEY,
    -- Position of the AccessDecided event in the log (the cursor of every query).
    position       bigint      NOT NULL UNIQUE,
    -- Position of the state the worker decided on (explain rebuilds it).
    state_position bigint      NOT NULL,
    node           text        NOT NULL,
    app            text        NOT NULL,
    stream         text        NOT NULL,
    action         text        NOT NULL,
    protocol       text        NOT NULL,
    subject        text,
    client_ip      inet        NOT NULL,
    allowed        boolean     NOT NULL,
    reason         text        NOT NULL,
    method         text,
    decided_at     timestamptz NOT NULL,
    record         jsonb       NOT NULL
);
CREATE INDEX decisions_app_stream ON decisions (app, stream, position);
CREATE INDEX decisions_subject ON decisions (subject, position) WHERE subject IS NOT NULL;
CREATE INDEX decisions_client_ip ON decisions USING gist (client_ip inet_ops);
CREATE INDEX decisions_reason ON decisions (reason, position);
CREATE INDEX decisions_node ON decisions (node, position);
CREATE INDEX decisions_decided_at ON decisions (decided_at);

-- Access-table snapshots of the state every N events, so explain rebuilds a past state from
-- the nearest one instead of from position 0.
CREATE TABLE state_checkpoints (
    position   bigint      PRIMARY KEY,
    snapshot   bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
