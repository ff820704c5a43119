//! The schema of the SQLite backend and how a file is opened: WAL mode, `synchronous=NORMAL`,
//! foreign keys, the busy handler, then every migration the file has not had yet.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use super::{connect, retry_busy, set_busy_timeout};
use crate::error::{Error, Result};

/// The schema, one entry per version. Never edit an entry that has shipped: add a new one.
const MIGRATIONS: &[&str] = &[
    // Version 1: accounts, sessions, servers, presence, groups, the store-and-forward queue
    // (a group message is stored once, with `grp` set; each member has a delivery position).
    "CREATE TABLE users (
        name          TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        x25519        BLOB NOT NULL,
        ed25519       BLOB NOT NULL,
        created_at    INTEGER NOT NULL
    );
    CREATE TABLE sessions (
        token_hash BLOB PRIMARY KEY,
        user       TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        expires_at INTEGER NOT NULL
    );
    CREATE INDEX sessions_expiry ON sessions(expires_at);
    CREATE TABLE servers (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        addr          TEXT NOT NULL,
        secret_hash   BLOB NOT NULL,
        registered_at INTEGER NOT NULL
    );
    CREATE TABLE presence (
        server_id INTEGER NOT NULL,
        conn_id   INTEGER NOT NULL,
        user      TEXT NOT NULL,
        PRIMARY KEY (server_id, conn_id)
    );
    CREATE INDEX presence_user ON presence(user, server_id);
    CREATE TABLE groups (
        name       TEXT PRIMARY KEY,
        admin      TEXT NOT NULL REFERENCES users(name),
        epoch      INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE members (
        grp      TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
        user     TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        seq      INTEGER NOT NULL,
        position INTEGER NOT NULL,
        PRIMARY KEY (grp, user)
    );
    CREATE INDEX members_user ON members(user);
    CREATE TABLE group_keys (
        grp        TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
        epoch      INTEGER NOT NULL,
        member     TEXT NOT NULL,
        wrapped    BLOB NOT NULL,
        wrapped_by TEXT NOT NULL,
        PRIMARY KEY (grp, epoch, member)
    );
    CREATE TABLE group_acks (
        grp    TEXT NOT NULL,
        user   TEXT NOT NULL,
        msg_id INTEGER NOT NULL,
        PRIMARY KEY (grp, user, msg_id),
        FOREIGN KEY (grp, user) REFERENCES members(grp, user) ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE TABLE files (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        owner      TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        server_id  INTEGER NOT NULL,
        conn_id    INTEGER NOT NULL,
        size       INTEGER NOT NULL,
        chunks     INTEGER NOT NULL,
        complete   INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX files_uploading ON files(server_id, conn_id) WHERE complete = 0;
    CREATE TABLE file_chunks (
        file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
        idx     INTEGER NOT NULL,
        data    BLOB NOT NULL,
        PRIMARY KEY (file_id, idx)
    );
    CREATE TABLE messages (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        sender    TEXT NOT NULL,
        recipient TEXT REFERENCES users(name) ON DELETE CASCADE,
        grp       TEXT REFERENCES groups(name) ON DELETE CASCADE,
        client_id INTEGER NOT NULL,
        body      BLOB NOT NULL,
        sent_at   INTEGER NOT NULL,
        file_id   INTEGER REFERENCES files(id),
        UNIQUE (sender, client_id),
        CHECK ((recipient IS NULL) <> (grp IS NULL))
    );
    -- Partial indexes: a message is in the one that applies to it, so storing and removing a
    -- message touches three b-trees (table, sender/client_id, one of these) instead of five.
    CREATE INDEX messages_recipient ON messages(recipient, id) WHERE recipient IS NOT NULL;
    CREATE INDEX messages_group ON messages(grp, id) WHERE grp IS NOT NULL;
    CREATE UNIQUE INDEX messages_file ON messages(file_id) WHERE file_id IS NOT NULL;
    -- Messages delivered and removed in about the last minute: a sender that lost its server
    -- re-sends what it never saw confirmed, and a message already delivered must not be stored
    -- twice. Keyed by message id, so new rows are appended (ids grow) and old ones are cut off
    -- as a range; a re-send names the id range to search (see `earlier`).
    -- The key a chat server shows the balancer to register: whoever can read this file is
    -- part of the cluster; a stranger on the network is not.
    CREATE TABLE cluster (
        id  INTEGER PRIMARY KEY CHECK (id = 1),
        key BLOB NOT NULL
    );
    CREATE TABLE delivered (
        msg_id    INTEGER PRIMARY KEY,
        sender    TEXT NOT NULL,
        client_id INTEGER NOT NULL
    );",
    // Version 2: trust by certificate. A chat server is known by the name in its certificate
    // (no secret, no cluster key); a session carries the public key its token is proven with;
    // a connection's presence row names its session, so that a server closes the connections
    // of sessions that ended. Sessions, presence and unfinished uploads from before are dropped
    // (everyone logs in again).
    "DROP TABLE cluster;
    DROP TABLE servers;
    CREATE TABLE servers (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        name          TEXT NOT NULL UNIQUE,
        addr          TEXT NOT NULL,
        registered_at INTEGER NOT NULL
    );
    DELETE FROM presence;
    ALTER TABLE presence ADD COLUMN token_hash BLOB;
    DELETE FROM sessions;
    ALTER TABLE sessions ADD COLUMN session_key BLOB NOT NULL DEFAULT x'';
    DELETE FROM files WHERE complete = 0;",
    // Version 3: membership chains. Every change of a group's membership is a signed link
    // that its members verify (see `membership`). Groups from before have no chain, so their
    // members could not verify them: they are removed, with their messages and keys.
    "CREATE TEMP TABLE old_group_files AS
         SELECT file_id FROM messages WHERE grp IS NOT NULL AND file_id IS NOT NULL;
    DELETE FROM messages WHERE grp IS NOT NULL;
    DELETE FROM files WHERE id IN (SELECT file_id FROM old_group_files);
    DROP TABLE old_group_files;
    DELETE FROM group_acks;
    DELETE FROM group_keys;
    DELETE FROM members;
    DELETE FROM groups;
    CREATE TABLE group_changes (
        grp    TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
        seq    INTEGER NOT NULL,
        change BLOB NOT NULL,
        PRIMARY KEY (grp, seq)
    ) WITHOUT ROWID;",
    // Version 4: an index to count a user's files (quotas).
    "CREATE INDEX files_owner ON files(owner);",
    // Version 5: names are unique regardless of case (`Alice` is taken once `alice` is; both
    // are stored as typed; accounts from before that differ only in case stay), and an
    // account may be marked to take new public keys once (an operator reset its password, or
    // made it without keys).
    "CREATE INDEX users_name_nocase ON users(name COLLATE NOCASE);
    CREATE INDEX groups_name_nocase ON groups(name COLLATE NOCASE);
    ALTER TABLE users ADD COLUMN rekey INTEGER NOT NULL DEFAULT 0;",
    // Version 6: prekeys for the asynchronous key agreement (forward secrecy): one signed
    // prekey per user, and one-time prekeys, each handed out once.
    "CREATE TABLE signed_prekeys (
        user      TEXT PRIMARY KEY REFERENCES users(name) ON DELETE CASCADE,
        id        INTEGER NOT NULL,
        public    BLOB NOT NULL,
        signature BLOB NOT NULL
    );
    CREATE TABLE one_time_prekeys (
        user   TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        id     INTEGER NOT NULL,
        public BLOB NOT NULL,
        PRIMARY KEY (user, id)
    ) WITHOUT ROWID;",
];

/// Opens (creating if needed) the database file and brings its schema up to date.
pub fn open(path: &Path) -> Result<Connection> {
    open_with(path, crate::db::DEFAULT_BUSY_TIMEOUT)
}

/// Like [`open`], waiting at most `busy_timeout` for other processes' locks.
pub fn open_with(path: &Path, busy_timeout: Duration) -> Result<Connection> {
    set_busy_timeout(busy_timeout);
    make_private(path)?;
    let conn = connect(path)?;
    // journal_mode returns a row, so it is queried rather than executed.
    let mode: String = retry_busy(busy_timeout, || {
        Ok(conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?)
    })?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Invalid(format!(
            "database {} cannot use WAL mode (got {mode})",
            path.display()
        )));
    }
    // A WAL file that grew under load is cut back to 64 MiB once it has been checkpointed.
    retry_busy(busy_timeout, || {
        Ok(conn.execute_batch(
            "PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON; PRAGMA temp_store=MEMORY;
             PRAGMA journal_size_limit=67108864;",
        )?)
    })?;
    retry_busy(busy_timeout, || migrate(&conn))?;
    Ok(conn)
}

/// Applies every migration newer than the file's `user_version`, each in its own transaction.
/// Safe to race with other processes doing the same: the version is re-read under the lock.
pub fn migrate(conn: &Connection) -> Result<()> {
    loop {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let version: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version >= MIGRATIONS.len() {
            conn.execute_batch("COMMIT")?;
            if version > MIGRATIONS.len() {
                return Err(Error::Invalid(format!(
                    "database schema version {version} is newer than this program ({}); upgrade fastchat",
                    MIGRATIONS.len()
                )));
            }
            return Ok(());
        }
        let step = conn
            .execute_batch(MIGRATIONS[version])
            .and_then(|()| conn.pragma_update(None, "user_version", version + 1));
        match step {
            Ok(()) => conn.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e.into());
            }
        }
    }
}

/// Creates the database file readable by its owner only (0600) if it does not exist, and
/// takes read access away from others on an existing one and its `-wal` and `-shm` files
/// (SQLite gives those the database file's mode when it creates them).
fn make_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(Error::Invalid(format!(
                "cannot create the database {}: {e}",
                path.display()
            )))
        }
    }
    for suffix in ["", "-wal", "-shm"] {
        let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        if let Ok(meta) = std::fs::metadata(&file) {
            if meta.permissions().mode() & 0o077 != 0 {
                let private = std::fs::Permissions::from_mode(meta.permissions().mode() & 0o700);
                if let Err(e) = std::fs::set_permissions(&file, private) {
                    log::warn!("cannot make {} private: {e}", file.display());
                }
            }
        }
    }
    Ok(())
}

/// The schema version this program writes.
pub fn version() -> usize {
    MIGRATIONS.len()
}
