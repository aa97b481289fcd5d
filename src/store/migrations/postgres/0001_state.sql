-- flagrelay's state store, PostgreSQL dialect (several hosts). Times are milliseconds
-- since the Unix epoch (UTC). Every statement is idempotent; sqlx holds an advisory lock
-- while migrating, so processes starting at once apply each migration once.

-- Per user: what flagrelay must remember between evaluations. Written only by the worker
-- holding the user's shard.
CREATE TABLE IF NOT EXISTS users (
    tenant_id       TEXT    NOT NULL,
    user_id         TEXT    NOT NULL,
    disabled_since  BIGINT,
    exemption_added BOOLEAN NOT NULL DEFAULT FALSE,
    recheck_at      BIGINT,
    updated_at      BIGINT  NOT NULL,
    PRIMARY KEY (tenant_id, user_id)
);

-- Users of a JSON state directory imported on first start: keyed by the old file name's
-- hash (the files do not name the user); read when `users` has no row, dropped once written.
CREATE TABLE IF NOT EXISTS legacy_users (
    key_hash TEXT PRIMARY KEY,
    state    TEXT NOT NULL
);

-- Work due at a time: a user's recheck (kept in step with users.recheck_at) or a wake-up
-- (an operator approved a held deactivation or accepted an identity). The leader queues
-- what is due.
CREATE TABLE IF NOT EXISTS due (
    tenant_id TEXT   NOT NULL,
    user_id   TEXT   NOT NULL,
    kind      TEXT   NOT NULL,
    due_at    BIGINT NOT NULL,
    queued_at BIGINT,
    PRIMARY KEY (tenant_id, user_id, kind)
);
CREATE INDEX IF NOT EXISTS due_by_time ON due (due_at);

CREATE TABLE IF NOT EXISTS delta_links (
    tenant_id TEXT PRIMARY KEY,
    link      TEXT   NOT NULL,
    saved_at  BIGINT NOT NULL
);

-- The breaker: one row per scope ('global', or an org domain). The global row is the lock
-- every deactivation takes.
CREATE TABLE IF NOT EXISTS breaker_scopes (
    scope       TEXT PRIMARY KEY,
    seq         BIGINT NOT NULL DEFAULT 0,
    trip        TEXT,
    released_at BIGINT
);
INSERT INTO breaker_scopes (scope, seq) VALUES ('global', 0) ON CONFLICT DO NOTHING;

-- Every deactivation the breaker let through (approved: released by an operator, not counted).
CREATE TABLE IF NOT EXISTS breaker_deactivations (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org       TEXT    NOT NULL,
    tenant_id TEXT    NOT NULL,
    user_id   TEXT    NOT NULL,
    at        BIGINT  NOT NULL,
    approved  BOOLEAN NOT NULL
);
CREATE INDEX IF NOT EXISTS breaker_deactivations_by_time ON breaker_deactivations (at);
CREATE INDEX IF NOT EXISTS breaker_deactivations_by_user ON breaker_deactivations (tenant_id, user_id, at);

-- Deactivations held by a trip, until an operator's release approves them.
CREATE TABLE IF NOT EXISTS breaker_held (
    tenant_id   TEXT   NOT NULL,
    user_id     TEXT   NOT NULL,
    org         TEXT   NOT NULL,
    held_at     BIGINT NOT NULL,
    approved_at BIGINT,
    PRIMARY KEY (tenant_id, user_id)
);

-- Identity bindings: the Graph object an address belongs to, one to one per tenant.
CREATE TABLE IF NOT EXISTS identity_bindings (
    tenant_id TEXT   NOT NULL,
    object_id TEXT   NOT NULL,
    address   TEXT   NOT NULL,
    bound_at  BIGINT NOT NULL,
    how       TEXT   NOT NULL,
    PRIMARY KEY (tenant_id, object_id),
    UNIQUE (tenant_id, address)
);

-- The last identity conflict of a user, until resolved or accepted.
CREATE TABLE IF NOT EXISTS identity_conflicts (
    tenant_id TEXT   NOT NULL,
    object_id TEXT   NOT NULL,
    address   TEXT   NOT NULL,
    reason    TEXT   NOT NULL,
    others    TEXT   NOT NULL,
    detail    TEXT   NOT NULL,
    seen_at   BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, object_id)
);

-- Every evaluation's result.
CREATE TABLE IF NOT EXISTS history (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         BIGINT  NOT NULL,
    tenant_id  TEXT    NOT NULL,
    user_id    TEXT    NOT NULL,
    upn        TEXT,
    address    TEXT,
    origin     TEXT    NOT NULL,
    result     TEXT    NOT NULL,
    action     TEXT,
    rule       TEXT,
    reason     TEXT    NOT NULL,
    writes     TEXT    NOT NULL,
    was_active BOOLEAN,
    is_active  BOOLEAN,
    was_exempt BOOLEAN,
    is_exempt  BOOLEAN,
    dry_run    BOOLEAN NOT NULL,
    latency_ms BIGINT,
    trace_id   TEXT,
    worker     TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_time ON history (at);
CREATE INDEX IF NOT EXISTS history_by_user ON history (user_id, at);
CREATE INDEX IF NOT EXISTS history_by_address ON history (address, at);
CREATE INDEX IF NOT EXISTS history_by_upn ON history (upn, at);

CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
