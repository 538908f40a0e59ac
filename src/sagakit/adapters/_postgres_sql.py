"""The SQL of the PostgreSQL saga log (:mod:`sagakit.adapters.postgres_log`).

Times are the server's (``now()``), handed to Python as seconds since the epoch.
Unqualified table names: they live in the first schema of the connection's
``search_path``.
"""

from __future__ import annotations

VERSION = 1  # the schema version this sagakit writes, and the newest it can use

UNFINISHED = "('running', 'compensating')"
FINAL = "('completed', 'compensated', 'failed')"

# Any constant will do, as long as every sagakit uses the same: "sagakit\0".
SCHEMA_LOCK = "SELECT pg_advisory_lock(8315161036475318272)"
SCHEMA_UNLOCK = "SELECT pg_advisory_unlock(8315161036475318272)"

SCHEMA_VERSION_EXISTS = "SELECT to_regclass('sagakit_schema_version')::text"

SCHEMA_VERSION = "SELECT max(version) FROM sagakit_schema_version"

SCHEMA = f"""
CREATE TABLE sagakit_schema_version (
    version integer NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS sagakit_sagas (
    id bigint GENERATED ALWAYS AS IDENTITY UNIQUE,  -- creation order
    saga_id text PRIMARY KEY,
    saga text NOT NULL,
    status text NOT NULL,
    version integer NOT NULL,  -- how many records the saga's log holds
    owner text,
    epoch bigint NOT NULL,  -- the fencing token, bumped by every claim
    lease_expires_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 80);  -- room for the in-place (HOT) updates of every flush
CREATE INDEX IF NOT EXISTS sagakit_sagas_unfinished
    ON sagakit_sagas (id) WHERE status IN {UNFINISHED};
CREATE INDEX IF NOT EXISTS sagakit_sagas_status ON sagakit_sagas (status, id);
CREATE TABLE IF NOT EXISTS sagakit_records (
    saga_id text NOT NULL,
    seq integer NOT NULL,
    kind text NOT NULL,
    version smallint NOT NULL,
    payload json NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, seq)
);
INSERT INTO sagakit_schema_version (version) VALUES ({VERSION});
"""

_EPOCH = "extract(epoch FROM {})::float8"

# One group commit: new sagas, checked appends, and the records of those that passed.
BATCH = f"""
WITH created AS (
    INSERT INTO sagakit_sagas AS s (saga_id, saga, status, version, owner, epoch, lease_expires_at)
    SELECT c.saga_id, c.saga, c.status, c.version,
           -- A saga that opens finished (no steps) is nobody's, as after its last flush.
           CASE WHEN c.status IN {FINAL} THEN NULL ELSE c.owner END,
           CASE WHEN c.owner IS NULL THEN 0 ELSE 1 END,
           CASE WHEN c.owner IS NULL OR c.status IN {FINAL} THEN NULL
               ELSE now() + c.ttl * interval '1 second' END
    FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::text[], $6::float8[])
        AS c(saga_id, saga, status, version, owner, ttl)
    ON CONFLICT (saga_id) DO NOTHING
    RETURNING s.saga_id, {_EPOCH.format("s.lease_expires_at")} AS expires_at
), appended AS (
    UPDATE sagakit_sagas AS s
    SET version = a.after,
        status = coalesce(a.status, s.status),
        owner = CASE WHEN a.status IN {FINAL} THEN NULL ELSE s.owner END,
        lease_expires_at = CASE WHEN a.status IN {FINAL} THEN NULL ELSE s.lease_expires_at END,
        updated_at = now()
    FROM unnest($7::text[], $8::bigint[], $9::int[], $10::int[], $11::text[])
        AS a(saga_id, epoch, expected, after, status)
    WHERE s.saga_id = a.saga_id AND s.epoch = a.epoch AND s.version = a.expected
        AND s.status IN {UNFINISHED}
    RETURNING s.saga_id, NULL::float8 AS expires_at
), passed AS (
    SELECT saga_id FROM created UNION ALL SELECT saga_id FROM appended
), written AS (
    INSERT INTO sagakit_records (saga_id, seq, kind, version, payload)
    SELECT r.saga_id, r.seq, r.kind, r.version, r.payload
    FROM unnest($12::text[], $13::int[], $14::text[], $15::int2[], $16::json[])
        AS r(saga_id, seq, kind, version, payload)
    WHERE r.saga_id IN (SELECT saga_id FROM passed)
)
SELECT saga_id, expires_at FROM created
UNION ALL
SELECT saga_id, expires_at FROM appended
"""

SAGA_STATES = """
SELECT saga_id, epoch, version, status FROM sagakit_sagas WHERE saga_id = ANY($1::text[])
"""

# A create whose reply was lost: is the saga in the log the one it wrote?
CREATED = f"""
SELECT saga, status, version, owner, epoch, {_EPOCH.format("lease_expires_at")} AS expires_at
FROM sagakit_sagas WHERE saga_id = $1
"""

OPENING = """
SELECT kind, version, payload FROM sagakit_records WHERE saga_id = $1 AND seq < $2 ORDER BY seq
"""

_LEASE = "now() + $3 * interval '1 second'"

CLAIM = f"""
UPDATE sagakit_sagas
SET epoch = epoch + 1, owner = $2, lease_expires_at = {_LEASE}
WHERE saga_id = $1 AND status IN {UNFINISHED}
    AND (owner IS NULL OR owner = $2 OR lease_expires_at <= now())
RETURNING id, saga_id, epoch, {_EPOCH.format("lease_expires_at")} AS expires_at
"""

CLAIM_NEXT = f"""
WITH free AS (
    SELECT saga_id FROM sagakit_sagas
    WHERE status IN {UNFINISHED} AND (owner IS NULL OR lease_expires_at <= now())
        AND saga_id <> ALL($4::text[])  -- those this worker cannot read
    ORDER BY id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE sagakit_sagas AS s
SET epoch = s.epoch + 1, owner = $1, lease_expires_at = now() + $2 * interval '1 second'
FROM free
WHERE s.saga_id = free.saga_id
RETURNING s.id, s.saga_id, s.epoch, {_EPOCH.format("s.lease_expires_at")} AS expires_at
"""

RENEW = f"""
UPDATE sagakit_sagas AS s
SET lease_expires_at = {_LEASE}
FROM unnest($1::text[], $2::bigint[]) AS r(saga_id, epoch)
WHERE s.saga_id = r.saga_id AND s.epoch = r.epoch AND s.status IN {UNFINISHED}
RETURNING s.saga_id, {_EPOCH.format("s.lease_expires_at")} AS expires_at
"""

RELEASE = f"""
UPDATE sagakit_sagas SET owner = NULL, lease_expires_at = NULL
WHERE saga_id = $1 AND epoch = $2 AND status IN {UNFINISHED}
"""

RELEASE_MANY = f"""
UPDATE sagakit_sagas AS s SET owner = NULL, lease_expires_at = NULL
FROM unnest($1::text[], $2::bigint[]) AS r(saga_id, epoch)
WHERE s.saga_id = r.saga_id AND s.epoch = r.epoch AND s.status IN {UNFINISHED}
"""

READ = "SELECT kind, version, payload FROM sagakit_records WHERE saga_id = $1 ORDER BY seq"

READ_MANY = """
SELECT saga_id, kind, version, payload FROM sagakit_records
WHERE saga_id = ANY($1::text[]) ORDER BY saga_id, seq
"""

HISTORY = f"""
SELECT seq, kind, version, payload, {_EPOCH.format("recorded_at")} AS recorded_at
FROM sagakit_records WHERE saga_id = $1 ORDER BY seq
"""

_SUMMARY = f"""
SELECT saga_id, saga, status, version, owner,
    {_EPOCH.format("lease_expires_at")} AS expires_at,
    {_EPOCH.format("created_at")} AS created_at,
    {_EPOCH.format("updated_at")} AS updated_at
FROM sagakit_sagas
"""

STATUS = _SUMMARY + "WHERE saga_id = $1"

LIST = _SUMMARY + "ORDER BY id DESC LIMIT $1"

LIST_STATUS = _SUMMARY + "WHERE status = ANY($1::text[]) ORDER BY id DESC LIMIT $2"
