//! The schema of the PostgreSQL backend: the concepts of the SQLite schema (same tables, same
//! columns), in PostgreSQL's types. `user` is a reserved word here, so that column is quoted.

use super::Conn;
use crate::error::{Error, Result};

/// The advisory lock migrations run under: processes that start together take turns.
const MIGRATE_LOCK: i64 = 0x6661_7374_6d69_6772;

/// The schema, one entry per version. Never edit an entry that has shipped: add a new one.
const MIGRATIONS: &[&str] = &[
    // Version 1: the SQLite schema's version 5, in one step.
    r#"CREATE TABLE users (
        name          TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        x25519        BYTEA NOT NULL,
        ed25519       BYTEA NOT NULL,
        created_at    BIGINT NOT NULL,
        rekey         BOOLEAN NOT NULL DEFAULT false
    );
    -- Names are unique regardless of case: `Alice` is taken once `alice` is.
    CREATE UNIQUE INDEX users_name_lower ON users (lower(name));
    CREATE TABLE sessions (
        token_hash  BYTEA PRIMARY KEY,
        "user"      TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        expires_at  BIGINT NOT NULL,
        session_key BYTEA NOT NULL
    );
    CREATE INDEX sessions_expiry ON sessions (expires_at);
    CREATE INDEX sessions_user ON sessions ("user");
    CREATE TABLE servers (
        id            BIGSERIAL PRIMARY KEY,
        name          TEXT NOT NULL UNIQUE,
        addr          TEXT NOT NULL,
        registered_at BIGINT NOT NULL
    );
    CREATE TABLE presence (
        server_id  BIGINT NOT NULL,
        conn_id    BIGINT NOT NULL,
        "user"     TEXT NOT NULL,
        token_hash BYTEA,
        PRIMARY KEY (server_id, conn_id)
    );
    CREATE INDEX presence_user ON presence ("user", server_id);
    CREATE TABLE groups (
        name       TEXT PRIMARY KEY,
        admin      TEXT NOT NULL REFERENCES users(name),
        epoch      BIGINT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE UNIQUE INDEX groups_name_lower ON groups (lower(name));
    CREATE TABLE members (
        grp      TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
        "user"   TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        seq      BIGINT NOT NULL,
        position BIGINT NOT NULL,
        PRIMARY KEY (grp, "user")
    );
    CREATE INDEX members_user ON members ("user");
    CREATE TABLE group_keys (
        grp        TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
        epoch      BIGINT NOT NULL,
        member     TEXT NOT NULL,
        wrapped    BYTEA NOT NULL,
        wrapped_by TEXT NOT NULL,
        PRIMARY KEY (grp, epoch, member)
    );
    CREATE TABLE group_acks (
        grp    TEXT NOT NULL,
        "user" TEXT NOT NULL,
        msg_id BIGINT NOT NULL,
        PRIMARY KEY (grp, "user", msg_id),
        FOREIGN KEY (grp, "user") REFERENCES members (grp, "user") ON DELETE CASCADE
    );
    CREATE TABLE group_changes (
        grp    TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
        seq    BIGINT NOT NULL,
        change BYTEA NOT NULL,
        PRIMARY KEY (grp, seq)
    );
    CREATE TABLE files (
        id         BIGSERIAL PRIMARY KEY,
        owner      TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        server_id  BIGINT NOT NULL,
        conn_id    BIGINT NOT NULL,
        size       BIGINT NOT NULL,
        chunks     BIGINT NOT NULL,
        complete   BOOLEAN NOT NULL DEFAULT false,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX files_uploading ON files (server_id, conn_id) WHERE NOT complete;
    CREATE INDEX files_owner ON files (owner);
    CREATE TABLE file_chunks (
        file_id BIGINT NOT NULL REFERENCES files(id) ON DELETE CASCADE,
        idx     BIGINT NOT NULL,
        data    BYTEA NOT NULL,
        PRIMARY KEY (file_id, idx)
    );
    -- Ids come from a sequence, taken under the writers' advisory lock (see the module
    -- `db::postgres`), so that they follow commit order.
    CREATE TABLE messages (
        id        BIGSERIAL PRIMARY KEY,
        sender    TEXT NOT NULL,
        recipient TEXT REFERENCES users(name) ON DELETE CASCADE,
        grp       TEXT REFERENCES groups(name) ON DELETE CASCADE,
        client_id BIGINT NOT NULL,
        body      BYTEA NOT NULL,
        sent_at   BIGINT NOT NULL,
        file_id   BIGINT REFERENCES files(id),
        UNIQUE (sender, client_id),
        CHECK ((recipient IS NULL) <> (grp IS NULL))
    );
    CREATE INDEX messages_recipient ON messages (recipient, id) WHERE recipient IS NOT NULL;
    CREATE INDEX messages_group ON messages (grp, id) WHERE grp IS NOT NULL;
    CREATE UNIQUE INDEX messages_file ON messages (file_id) WHERE file_id IS NOT NULL;
    -- Messages delivered and removed in about the last minute (see the SQLite schema).
    CREATE TABLE delivered (
        msg_id    BIGINT PRIMARY KEY,
        sender    TEXT NOT NULL,
        client_id BIGINT NOT NULL
    );"#,
    // Version 2: prekeys for the asynchronous key agreement (SQLite's version 6).
    r#"CREATE TABLE signed_prekeys (
        "user"    TEXT PRIMARY KEY REFERENCES users(name) ON DELETE CASCADE,
        id        BIGINT NOT NULL,
        public    BYTEA NOT NULL,
        signature BYTEA NOT NULL
    );
    CREATE TABLE one_time_prekeys (
        "user" TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        id     BIGINT NOT NULL,
        public BYTEA NOT NULL,
        PRIMARY KEY ("user", id)
    );"#,
];

/// Applies every migration the database has not had, in one transaction, under an advisory
/// lock (the version is read under it, so racing processes apply each step once).
pub fn migrate(conn: &mut Conn) -> Result<()> {
    conn.batch(&format!(
        "BEGIN; SELECT pg_advisory_xact_lock({MIGRATE_LOCK});
         CREATE TABLE IF NOT EXISTS fastchat_schema (version INTEGER NOT NULL);"
    ))?;
    let step = (|| -> Result<()> {
        let version: i32 = match conn.opt("SELECT version FROM fastchat_schema", &[])? {
            Some(row) => row.try_get(0)?,
            None => {
                conn.exec("INSERT INTO fastchat_schema (version) VALUES (0)", &[])?;
                0
            }
        };
        let version = version.max(0) as usize;
        if version > MIGRATIONS.len() {
            return Err(Error::Invalid(format!(
                "database schema version {version} is newer than this program ({}); upgrade \
                 fastchat",
                MIGRATIONS.len()
            )));
        }
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(version) {
            conn.batch(migration)?;
            conn.exec(
                "UPDATE fastchat_schema SET version = $1",
                &[&(i as i32 + 1)],
            )?;
        }
        Ok(())
    })();
    match step {
        Ok(()) => conn.batch("COMMIT"),
        Err(e) => {
            let _ = conn.batch("ROLLBACK");
            Err(e)
        }
    }
}

/// The schema version this program writes.
pub fn version() -> usize {
    MIGRATIONS.len()
}
