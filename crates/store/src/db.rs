//! The SQLite validity database, `$NIX_STATE_DIR/db/db.sqlite`, in Nix 2.x's schema
//! version 10 (the number in the neighbouring `db/schema` file):
//!
//! ```text
//! ValidPaths(id, path unique, hash, registrationTime, deriver, narSize, ultimate, sigs, ca)
//!     path      absolute store path
//!     hash      narHash as "sha256:<base16>"
//!     deriver   absolute .drv path or null
//!     narSize   bytes of the NAR or null
//!     ultimate  1 when built here, else null
//!     sigs      space-separated "key:base64", null when none
//!     ca        "fixed:r:sha256:<base32>", "text:sha256:<base32>" ... or null
//! Refs(referrer -> ValidPaths.id on delete cascade, reference -> ValidPaths.id on delete restrict)
//! DerivationOutputs(drv -> ValidPaths.id on delete cascade, id = output name, path)
//! FailedPaths(path, time)         nixb's own: the failed-build cache of Nix 1.x
//! ```
//!
//! This module is the SQL and nothing else: it speaks in absolute path strings and row
//! ids, and leaves store semantics (closure checks, parsing derivations) to
//! [`LocalStore`](crate::local_store::LocalStore). Every write runs inside
//! [`Db::transaction`], which takes SQLite's write lock up front and retries while
//! another process (nixb or Nix) holds it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

/// The schema version Nix 2.x (2.0 through 2.8 and later) writes to `db/schema`.
pub const SCHEMA_VERSION: u32 = 10;

/// How long one statement waits on a lock held by another process before SQLite gives
/// up with `SQLITE_BUSY`. Nix waits an hour; builds legitimately hold the lock for the
/// length of a registration, never long, so a long wait only hides a stuck process.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// The tables and indices of schema 10. Column names, types, keys and cascade rules are
/// what Nix reads and writes; the `DeleteSelfRefs` trigger lets a path that refers to
/// itself be deleted despite the `restrict` rule on `Refs.reference`.
const SCHEMA: &str = "
create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer,
    sigs             text,
    ca               text
);
create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);
create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;
create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null,
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);
create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
";

/// nixb's own table. Created on every open (not only with the schema) so that a store
/// made by Nix gains it the first time nixb opens it; Nix ignores tables it does not know.
const NIXB_TABLES: &str = "
create table if not exists FailedPaths (
    path text primary key not null,
    time integer not null
);
";

#[derive(Debug, thiserror::Error)]
#[error("database {db}: {step}: {source}")]
pub struct DbError {
    pub db: PathBuf,
    pub step: String,
    #[source]
    pub source: rusqlite::Error,
}

/// One row of `ValidPaths`, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathRow {
    pub id: i64,
    pub path: String,
    pub hash: String,
    pub registration_time: i64,
    pub deriver: Option<String>,
    pub nar_size: Option<i64>,
    pub ultimate: bool,
    pub sigs: Option<String>,
    pub ca: Option<String>,
}

/// An open validity database.
pub struct Db {
    conn: Connection,
    file: PathBuf,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("file", &self.file).finish()
    }
}

impl Db {
    /// Opens `file`, creating it with the schema when `create` is set. The connection is
    /// set up as Nix sets up its own, so that the two can share the file: write-ahead
    /// log, foreign keys enforced, `synchronous = normal`, a long busy timeout.
    pub fn open(file: &Path, create: bool) -> Result<Db, DbError> {
        let err = |step: &str| {
            let db = file.to_path_buf();
            let step = step.to_string();
            move |source| DbError { db, step, source }
        };
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let conn = Connection::open_with_flags(file, flags).map_err(err("opening"))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(err("setting busy timeout"))?;
        // Room for every statement this module prepares, plus the transaction ones.
        conn.set_prepared_statement_cache_capacity(32);
        conn.execute_batch("pragma foreign_keys = 1; pragma synchronous = normal;")
            .map_err(err("setting pragmas"))?;
        // The page size only takes effect before the first table exists; Nix uses 4096.
        if create {
            conn.execute_batch("pragma main.page_size = 4096;")
                .map_err(err("setting page size"))?;
        }
        let mode: String = conn
            .query_row("pragma main.journal_mode", [], |r| r.get(0))
            .map_err(err("reading journal mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            let _: String = conn
                .query_row("pragma main.journal_mode = wal", [], |r| r.get(0))
                .map_err(err("switching to write-ahead log"))?;
        }
        // Checkpoint less often than SQLite's default, as Nix does: registering a large
        // closure writes many pages and the checkpoints dominate otherwise.
        conn.execute_batch("pragma wal_autocheckpoint = 40000;")
            .map_err(err("setting wal autocheckpoint"))?;
        let db = Db {
            conn,
            file: file.to_path_buf(),
        };
        if create {
            db.transaction("creating schema", |db| db.exec(SCHEMA, "creating schema"))?;
        }
        db.transaction("creating nixb tables", |db| {
            db.exec(NIXB_TABLES, "creating nixb tables")
        })?;
        Ok(db)
    }

    /// Lets SQLite cache up to `kib` KiB of pages on this connection (its default is
    /// 2 MiB). A transaction that touches more pages than fit spills them into the
    /// write-ahead log and writes them again: whole-store work (deleting thousands of
    /// rows at once) wants a bigger cache; the memory is taken only as pages are read.
    pub fn set_cache_size_kib(&self, kib: u32) -> Result<(), DbError> {
        self.exec(
            &format!("pragma cache_size = -{kib}"),
            "setting the page cache size",
        )
    }

    /// Keeps this connection's temporary files in memory: the statement journal, which a
    /// statement changing many rows under foreign keys and triggers writes as it goes
    /// (otherwise a file in the temporary directory, whatever file system that is on).
    pub fn keep_temp_files_in_memory(&self) -> Result<(), DbError> {
        self.exec(
            "pragma temp_store = memory",
            "keeping temporary files in memory",
        )
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    fn wrap(&self, step: &str) -> impl FnOnce(rusqlite::Error) -> DbError {
        let db = self.file.clone();
        let step = step.to_string();
        move |source| DbError { db, step, source }
    }

    fn exec(&self, sql: &str, step: &str) -> Result<(), DbError> {
        self.conn.execute_batch(sql).map_err(self.wrap(step))
    }

    /// Runs one statement without parameters through the statement cache: `begin`,
    /// `commit` and `rollback` run for every registration, and `execute_batch` would
    /// parse them anew each time (which showed up in profiles of 1,000 builds).
    fn exec_cached(&self, sql: &str) -> Result<(), rusqlite::Error> {
        self.conn.prepare_cached(sql)?.execute([]).map(|_| ())
    }

    /// Runs `f` in one read transaction, so that all its queries see one state of the
    /// database (in WAL mode, a snapshot taken at the first read) even while other
    /// processes register paths: a reader of several tables (a collector reading paths,
    /// then references) would otherwise see references to rows it did not read.
    pub fn read_snapshot<T, E>(
        &self,
        what: &str,
        f: impl FnOnce(&Db) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<DbError>,
    {
        self.exec_cached("begin")
            .map_err(|e| self.wrap(&format!("{what}: beginning a read transaction"))(e))?;
        let r = f(self);
        // Ending a transaction that wrote nothing releases the snapshot; it cannot lose data.
        let _ = self.exec_cached(if r.is_ok() { "commit" } else { "rollback" });
        r
    }

    /// Runs `f` in one write transaction: everything it did is committed together, or
    /// rolled back when it returns an error. `begin immediate` takes the write lock at
    /// once, so two writers never deadlock trying to upgrade read locks; when the lock is
    /// still busy after the busy timeout (or SQLite reports busy without waiting, which
    /// it does in some WAL situations), the whole transaction is retried.
    pub fn transaction<T, E>(
        &self,
        what: &str,
        mut f: impl FnMut(&Db) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<DbError>,
    {
        let started = Instant::now();
        loop {
            match self.exec_cached("begin immediate") {
                Ok(()) => {}
                Err(e) if is_busy(&e) && started.elapsed() < BUSY_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => {
                    return Err(self.wrap(&format!("{what}: beginning transaction"))(e).into())
                }
            }
            match f(self) {
                Ok(v) => match self.exec_cached("commit") {
                    Ok(()) => return Ok(v),
                    Err(e) => {
                        let _ = self.exec_cached("rollback");
                        if is_busy(&e) && started.elapsed() < BUSY_TIMEOUT {
                            continue;
                        }
                        return Err(self.wrap(&format!("{what}: committing"))(e).into());
                    }
                },
                Err(e) => {
                    let _ = self.exec_cached("rollback");
                    return Err(e);
                }
            }
        }
    }

    pub fn path_id(&self, path: &str) -> Result<Option<i64>, DbError> {
        self.conn
            .prepare_cached("select id from ValidPaths where path = ?1")
            .and_then(|mut s| s.query_row([path], |r| r.get(0)).optional())
            .map_err(self.wrap(&format!("looking up {path}")))
    }

    /// The first valid path at or after `prefix` in the table's order, if it starts with
    /// `prefix`: one index lookup, as Nix's `queryPathFromHashPart` does it.
    pub fn path_with_prefix(&self, prefix: &str) -> Result<Option<String>, DbError> {
        let found: Option<String> = self
            .conn
            .prepare_cached("select path from ValidPaths where path >= ?1 order by path limit 1")
            .and_then(|mut s| s.query_row([prefix], |r| r.get(0)).optional())
            .map_err(self.wrap(&format!("looking up paths starting with {prefix}")))?;
        Ok(found.filter(|p| p.starts_with(prefix)))
    }

    pub fn path_row(&self, path: &str) -> Result<Option<PathRow>, DbError> {
        self.conn
            .prepare_cached(
                "select id, path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca \
                 from ValidPaths where path = ?1",
            )
            .and_then(|mut s| {
                s.query_row([path], |r| {
                    Ok(PathRow {
                        id: r.get(0)?,
                        path: r.get(1)?,
                        hash: r.get(2)?,
                        registration_time: r.get(3)?,
                        deriver: r.get(4)?,
                        nar_size: r.get(5)?,
                        ultimate: r.get::<_, Option<i64>>(6)?.unwrap_or(0) != 0,
                        sigs: r.get(7)?,
                        ca: r.get(8)?,
                    })
                })
                .optional()
            })
            .map_err(self.wrap(&format!("reading path info of {path}")))
    }

    /// The row of `path` and the paths it refers to, in one statement: one read of the
    /// database's state (a reference cannot go missing between two queries), and one
    /// round of SQLite's locking instead of two. What `QueryPathInfo` costs a daemon.
    pub fn path_row_with_references(
        &self,
        path: &str,
    ) -> Result<Option<(PathRow, Vec<String>)>, DbError> {
        let read = || -> rusqlite::Result<Option<(PathRow, Vec<String>)>> {
            let mut s = self.conn.prepare_cached(
                "select v.id, v.path, v.hash, v.registrationTime, v.deriver, v.narSize, \
                 v.ultimate, v.sigs, v.ca, r.path \
                 from ValidPaths v left join Refs on Refs.referrer = v.id \
                 left join ValidPaths r on r.id = Refs.reference \
                 where v.path = ?1",
            )?;
            let mut rows = s.query([path])?;
            let mut found: Option<(PathRow, Vec<String>)> = None;
            while let Some(row) = rows.next()? {
                let refs = match &mut found {
                    Some((_, refs)) => refs,
                    empty => {
                        &mut empty
                            .insert((
                                PathRow {
                                    id: row.get(0)?,
                                    path: row.get(1)?,
                                    hash: row.get(2)?,
                                    registration_time: row.get(3)?,
                                    deriver: row.get(4)?,
                                    nar_size: row.get(5)?,
                                    ultimate: row.get::<_, Option<i64>>(6)?.unwrap_or(0) != 0,
                                    sigs: row.get(7)?,
                                    ca: row.get(8)?,
                                },
                                Vec::new(),
                            ))
                            .1
                    }
                };
                // A path without references has one row, with no referenced path.
                if let Some(r) = row.get::<_, Option<String>>(9)? {
                    refs.push(r);
                }
            }
            Ok(found)
        };
        read().map_err(self.wrap(&format!("reading path info of {path}")))
    }

    /// Inserts a new row (the `id` of `row` is ignored) and returns its id.
    pub fn insert_path(&self, row: &PathRow) -> Result<i64, DbError> {
        self.conn
            .prepare_cached(
                "insert into ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca) \
                 values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    row.path,
                    row.hash,
                    row.registration_time,
                    row.deriver,
                    row.nar_size,
                    row.ultimate.then_some(1i64),
                    row.sigs,
                    row.ca
                ])
            })
            .map_err(self.wrap(&format!("registering {}", row.path)))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Overwrites what can change when a valid path is registered again (Nix keeps the
    /// original registration time and deriver).
    pub fn update_path(&self, row: &PathRow) -> Result<(), DbError> {
        self.conn
            .prepare_cached(
                "update ValidPaths set narSize = ?1, hash = ?2, ultimate = ?3, sigs = ?4, ca = ?5 where path = ?6",
            )
            .and_then(|mut s| {
                s.execute(params![
                    row.nar_size,
                    row.hash,
                    row.ultimate.then_some(1i64),
                    row.sigs,
                    row.ca,
                    row.path
                ])
            })
            .map(|_| ())
            .map_err(self.wrap(&format!("updating path info of {}", row.path)))
    }

    pub fn add_reference(&self, referrer: i64, reference: i64) -> Result<(), DbError> {
        self.conn
            .prepare_cached("insert or replace into Refs (referrer, reference) values (?1, ?2)")
            .and_then(|mut s| s.execute(params![referrer, reference]))
            .map(|_| ())
            .map_err(self.wrap("adding reference"))
    }

    /// Paths that the path with row id `id` refers to.
    pub fn references(&self, id: i64) -> Result<Vec<String>, DbError> {
        self.strings(
            "select path from Refs join ValidPaths on reference = id where referrer = ?1",
            params![id],
            "querying references",
        )
    }

    /// Paths that refer to `path`.
    pub fn referrers(&self, path: &str) -> Result<Vec<String>, DbError> {
        self.strings(
            "select path from Refs join ValidPaths on referrer = id \
             where reference = (select id from ValidPaths where path = ?1)",
            params![path],
            &format!("querying referrers of {path}"),
        )
    }

    pub fn add_derivation_output(&self, drv: i64, output: &str, path: &str) -> Result<(), DbError> {
        self.conn
            .prepare_cached(
                "insert or replace into DerivationOutputs (drv, id, path) values (?1, ?2, ?3)",
            )
            .and_then(|mut s| s.execute(params![drv, output, path]))
            .map(|_| ())
            .map_err(self.wrap(&format!("recording output {output} = {path}")))
    }

    /// `(output name, path)` of the derivation with row id `drv`.
    pub fn derivation_outputs(&self, drv: i64) -> Result<Vec<(String, String)>, DbError> {
        let mut s = self
            .conn
            .prepare_cached("select id, path from DerivationOutputs where drv = ?1")
            .map_err(self.wrap("querying derivation outputs"))?;
        let rows = s
            .query_map([drv], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(self.wrap("querying derivation outputs"))?;
        Ok(rows)
    }

    /// Valid derivations that list `path` as one of their outputs.
    pub fn valid_derivers(&self, path: &str) -> Result<Vec<String>, DbError> {
        self.strings(
            "select v.path from DerivationOutputs d join ValidPaths v on d.drv = v.id where d.path = ?1",
            params![path],
            &format!("querying derivers of {path}"),
        )
    }

    /// Deletes a path's row; its references and derivation outputs go with it (cascade).
    /// Fails with a foreign key error while another path still refers to it.
    pub fn delete_path(&self, id: i64) -> Result<(), DbError> {
        self.conn
            .prepare_cached("delete from ValidPaths where id = ?1")
            .and_then(|mut s| s.execute([id]))
            .map(|_| ())
            .map_err(self.wrap("invalidating path"))
    }

    /// Deletes the rows of `ids` together, inside the caller's transaction: first the
    /// references they make, then the rows (their derivation outputs go by cascade), one
    /// statement each for the whole set. Fails with a foreign key error, deleting nothing
    /// once the caller rolls back, while a row outside `ids` still refers to one of them.
    pub fn delete_paths(&self, ids: &[i64]) -> Result<(), DbError> {
        let list = json_ids(ids);
        // With the outgoing references gone first, the `restrict` rule on
        // `Refs.reference` (checked row by row, not at the end of the statement) only
        // fires for a referrer outside the set, whatever order SQLite deletes the rows in.
        for sql in [
            "delete from Refs where referrer in (select value from json_each(?1))",
            "delete from ValidPaths where id in (select value from json_each(?1))",
        ] {
            self.conn
                .prepare_cached(sql)
                .and_then(|mut s| s.execute([&list]))
                .map_err(self.wrap("invalidating paths"))?;
        }
        Ok(())
    }

    /// Deletes the rows of `ids` together in one transaction of its own, as
    /// [`Db::delete_paths`] does, for a collector deleting thousands of rows at once.
    ///
    /// On a database of exactly Nix's schema (plus nixb's own tables), the work that
    /// foreign keys and the `DeleteSelfRefs` trigger would do row by row (a trigger
    /// program and three index lookups for every deleted path) is done by four
    /// statements over the whole set instead, with both switched off on this connection
    /// for the transaction: the set's references, then a check that nothing outside the
    /// set still refers into it (the `restrict` rule: the transaction fails and deletes
    /// nothing if so), then their derivation outputs (the cascade), then the rows. The
    /// outcome is the enforced one in every case; a crash rolls it back as a whole. A
    /// database with other tables or triggers (Nix's content-addressed derivations add
    /// some) takes the enforced path, so that no cascade of theirs is missed.
    pub fn invalidate_paths(&self, what: &str, ids: &[i64]) -> Result<(), DbError> {
        if ids.is_empty() {
            return Ok(());
        }
        let list = json_ids(ids);
        let by_hand = self.with_rules_suspended(what, |db| {
            db.delete_path_set_by_hand(&list)?;
            Ok(true)
        })?;
        if by_hand {
            return Ok(());
        }
        self.transaction(what, |db| db.delete_paths(ids))
    }

    /// Runs `f` in one transaction with foreign keys and triggers off on this connection,
    /// on a database of exactly Nix's schema (plus nixb's tables), whose rules `f` carries
    /// out itself; on any other schema `f` is not run and the answer is false. Whatever
    /// happened, the connection enforces the rules again before it is used for anything
    /// else.
    fn with_rules_suspended(
        &self,
        what: &str,
        mut f: impl FnMut(&Db) -> Result<bool, DbError>,
    ) -> Result<bool, DbError> {
        if let Err(e) = self.set_enforcement(false) {
            let _ = self.set_enforcement(true);
            return Err(e);
        }
        let done = self.transaction(what, |db| {
            // Read under the write lock, so no table can appear before the commit.
            if !db.schema_is_nix_own()? {
                return Ok(false);
            }
            f(db)
        });
        self.set_enforcement(true)?;
        done
    }

    /// Deletes every row of `ValidPaths` with an id up to `max_id` except those of `keep`,
    /// with their references and derivation outputs, in one transaction; rows above
    /// `max_id` (registered since the caller read the table: ids only grow) are kept too.
    /// For a collector deleting most of the store: the kept rows are copied aside, the
    /// three tables emptied (SQLite frees their pages without visiting the rows, with
    /// foreign keys and triggers off as in [`Db::invalidate_paths`]) and the kept rows
    /// put back, ids unchanged; the cost follows the kept rows and the table sizes, where
    /// deleting rows one by one costs index seeks per deleted row and reference.
    ///
    /// Deletes nothing and returns false where the database is not exactly Nix's schema
    /// (plus nixb's tables), or where a kept row refers to one that would go (the
    /// `restrict` rule): the caller then deletes row by row.
    pub fn keep_only_paths(&self, what: &str, keep: &[i64], max_id: i64) -> Result<bool, DbError> {
        let done = self.with_rules_suspended(what, |db| db.keep_only_by_hand(keep, max_id));
        let _ = self.exec(
            "drop table if exists temp.gc_keep; drop table if exists temp.gc_paths; \
             drop table if exists temp.gc_refs; drop table if exists temp.gc_outputs",
            "dropping the collector's temporary tables",
        );
        done
    }

    /// The work of [`Db::keep_only_paths`], inside its transaction.
    fn keep_only_by_hand(&self, keep: &[i64], max_id: i64) -> Result<bool, DbError> {
        let step = "copying the rows to keep";
        self.exec(
            "create temp table gc_keep (id integer primary key not null)",
            step,
        )?;
        {
            let mut insert = self
                .conn
                .prepare_cached("insert into temp.gc_keep (id) values (?1)")
                .map_err(self.wrap(step))?;
            for id in keep {
                insert.execute([id]).map_err(self.wrap(step))?;
            }
        }
        let kept =
            |column: &str| format!("({column} > ?1 or {column} in (select id from temp.gc_keep))");
        let copy = |table: &str, copy: &str, column: &str| {
            self.conn
                .execute(
                    &format!(
                        "create temp table {copy} as select * from main.{table} where {}",
                        kept(column)
                    ),
                    [max_id],
                )
                .map(|_| ())
                .map_err(self.wrap(step))
        };
        copy("ValidPaths", "gc_paths", "id")?;
        copy("Refs", "gc_refs", "referrer")?;
        copy("DerivationOutputs", "gc_outputs", "drv")?;
        let blocked: Option<i64> = self
            .conn
            .query_row(
                &format!(
                    "select reference from temp.gc_refs where not {} limit 1",
                    kept("reference")
                ),
                [max_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.wrap("checking for references into the deleted paths"))?;
        if blocked.is_some() {
            // Nothing of the store's tables has changed: committing is as good as not.
            return Ok(false);
        }
        self.exec(
            "delete from main.Refs; delete from main.DerivationOutputs; \
             delete from main.ValidPaths; \
             insert into main.ValidPaths select * from temp.gc_paths; \
             insert into main.Refs select * from temp.gc_refs; \
             insert into main.DerivationOutputs select * from temp.gc_outputs",
            "putting the kept rows back",
        )?;
        Ok(true)
    }

    /// Switches foreign keys and triggers on or off on this connection (outside a
    /// transaction; both settings expire the prepared statements that depend on them).
    fn set_enforcement(&self, on: bool) -> Result<(), DbError> {
        let step = if on {
            "enforcing foreign keys and triggers again"
        } else {
            "suspending foreign keys and triggers"
        };
        self.exec(
            if on {
                "pragma foreign_keys = 1"
            } else {
                "pragma foreign_keys = 0"
            },
            step,
        )?;
        self.conn
            .set_db_config(
                rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER,
                on,
            )
            .map(|_| ())
            .map_err(self.wrap(step))
    }

    /// Whether the database holds exactly the tables and triggers of Nix's schema 10 and
    /// nixb's own tables, whose rules [`Db::delete_path_set_by_hand`] carries out.
    fn schema_is_nix_own(&self) -> Result<bool, DbError> {
        const KNOWN: &[(&str, &str)] = &[
            ("table", "ValidPaths"),
            ("table", "Refs"),
            ("table", "DerivationOutputs"),
            ("table", "FailedPaths"),
            ("table", "sqlite_sequence"),
            ("trigger", "DeleteSelfRefs"),
        ];
        let step = "reading the schema";
        let mut s = self
            .conn
            .prepare_cached(
                "select type, name from sqlite_master where type in ('table', 'trigger')",
            )
            .map_err(self.wrap(step))?;
        let rows = s
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(self.wrap(step))?;
        Ok(rows.iter().all(|(t, n)| {
            KNOWN
                .iter()
                .any(|(kt, kn)| t == kt && n.eq_ignore_ascii_case(kn))
        }))
    }

    /// The deletion of [`Db::invalidate_paths`] with foreign keys and triggers off; `list`
    /// is the ids as a JSON array.
    fn delete_path_set_by_hand(&self, list: &str) -> Result<(), DbError> {
        let run = |sql: &str| {
            self.conn
                .prepare_cached(sql)
                .and_then(|mut s| s.execute([list]))
                .map(|_| ())
                .map_err(self.wrap("invalidating paths"))
        };
        // Every reference the set makes, self references included (the trigger's job).
        run("delete from Refs where referrer in (select value from json_each(?1))")?;
        // What is left pointing into the set comes from outside it: `restrict`.
        let blocked: Option<(i64, i64)> = self
            .conn
            .prepare_cached(
                "select referrer, reference from Refs \
                 where reference in (select value from json_each(?1)) limit 1",
            )
            .and_then(|mut s| {
                s.query_row([list], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(self.wrap("checking for references into the deleted paths"))?;
        if let Some((referrer, reference)) = blocked {
            return Err(DbError {
                db: self.file.clone(),
                step: format!(
                    "invalidating paths: row {reference} of ValidPaths is still referred to by row {referrer}"
                ),
                source: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY),
                    Some("FOREIGN KEY constraint failed".into()),
                ),
            });
        }
        run("delete from DerivationOutputs where drv in (select value from json_each(?1))")?;
        run("delete from ValidPaths where id in (select value from json_each(?1))")
    }

    /// Calls `f(id, path, deriver)` for every row of `ValidPaths` in increasing id order
    /// (the table's own order), in one statement: how a collector reads the whole store
    /// without a query per path.
    pub fn scan_valid_paths(
        &self,
        mut f: impl FnMut(i64, &str, Option<&str>),
    ) -> Result<(), DbError> {
        let step = "reading all valid paths";
        let mut s = self
            .conn
            .prepare("select id, path, deriver from ValidPaths order by id")
            .map_err(self.wrap(step))?;
        let mut rows = s.query([]).map_err(self.wrap(step))?;
        while let Some(r) = rows.next().map_err(self.wrap(step))? {
            let id: i64 = r.get(0).map_err(self.wrap(step))?;
            let path = r
                .get_ref(1)
                .and_then(|v| Ok(v.as_str()?))
                .map_err(self.wrap(step))?;
            let deriver = r
                .get_ref(2)
                .and_then(|v| Ok(v.as_str_or_null()?))
                .map_err(self.wrap(step))?;
            f(id, path, deriver);
        }
        Ok(())
    }

    /// Calls `f(referrer, reference)` for every row of `Refs`, ordered by referrer (the
    /// order of the table's primary key, so SQLite reads it without sorting).
    pub fn scan_references(&self, mut f: impl FnMut(i64, i64)) -> Result<(), DbError> {
        let step = "reading all references";
        let mut s = self
            .conn
            .prepare("select referrer, reference from Refs order by referrer")
            .map_err(self.wrap(step))?;
        let mut rows = s.query([]).map_err(self.wrap(step))?;
        while let Some(r) = rows.next().map_err(self.wrap(step))? {
            f(
                r.get(0).map_err(self.wrap(step))?,
                r.get(1).map_err(self.wrap(step))?,
            );
        }
        Ok(())
    }

    /// Calls `f(drv, output path)` for every row of `DerivationOutputs`.
    pub fn scan_derivation_outputs(&self, mut f: impl FnMut(i64, &str)) -> Result<(), DbError> {
        let step = "reading all derivation outputs";
        let mut s = self
            .conn
            .prepare("select drv, path from DerivationOutputs")
            .map_err(self.wrap(step))?;
        let mut rows = s.query([]).map_err(self.wrap(step))?;
        while let Some(r) = rows.next().map_err(self.wrap(step))? {
            let drv: i64 = r.get(0).map_err(self.wrap(step))?;
            let path = r
                .get_ref(1)
                .and_then(|v| Ok(v.as_str()?))
                .map_err(self.wrap(step))?;
            f(drv, path);
        }
        Ok(())
    }

    /// Every valid path.
    pub fn all_paths(&self) -> Result<Vec<String>, DbError> {
        self.strings("select path from ValidPaths", [], "listing valid paths")
    }

    pub fn has_failed(&self, path: &str) -> Result<bool, DbError> {
        self.conn
            .prepare_cached("select 1 from FailedPaths where path = ?1")
            .and_then(|mut s| s.exists([path]))
            .map_err(self.wrap(&format!("querying failure of {path}")))
    }

    pub fn add_failed(&self, path: &str, time: i64) -> Result<(), DbError> {
        self.conn
            .prepare_cached("insert or replace into FailedPaths (path, time) values (?1, ?2)")
            .and_then(|mut s| s.execute(params![path, time]))
            .map(|_| ())
            .map_err(self.wrap(&format!("recording failure of {path}")))
    }

    pub fn clear_failed(&self, path: &str) -> Result<(), DbError> {
        self.conn
            .prepare_cached("delete from FailedPaths where path = ?1")
            .and_then(|mut s| s.execute([path]))
            .map(|_| ())
            .map_err(self.wrap(&format!("clearing failure of {path}")))
    }

    fn strings(
        &self,
        sql: &str,
        p: impl rusqlite::Params,
        step: &str,
    ) -> Result<Vec<String>, DbError> {
        let mut s = self.conn.prepare_cached(sql).map_err(self.wrap(step))?;
        let rows = s
            .query_map(p, |r| r.get(0))
            .and_then(|it| it.collect::<Result<Vec<String>, _>>())
            .map_err(self.wrap(step))?;
        Ok(rows)
    }
}

/// The ids as a JSON array, which `json_each` turns into a table: one statement whatever
/// the number of ids (bound parameters are limited to 32,766).
fn json_ids(ids: &[i64]) -> String {
    use std::fmt::Write;
    let mut list = String::with_capacity(ids.len() * 8 + 2);
    list.push('[');
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            list.push(',');
        }
        let _ = write!(list, "{id}");
    }
    list.push(']');
    list
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(path: &str) -> PathRow {
        PathRow {
            id: 0,
            path: path.into(),
            hash: format!("sha256:{}", "0".repeat(64)),
            registration_time: 1,
            deriver: None,
            nar_size: Some(120),
            ultimate: false,
            sigs: None,
            ca: None,
        }
    }

    #[test]
    fn schema_has_nix_tables_and_wal() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("db.sqlite");
        let db = Db::open(&f, true).unwrap();
        let mode: String = db
            .conn
            .query_row("pragma journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let names: Vec<String> = db
            .strings("select name from sqlite_master where type in ('table','index','trigger') order by name", [], "x")
            .unwrap();
        for n in [
            "DeleteSelfRefs",
            "DerivationOutputs",
            "FailedPaths",
            "IndexDerivationOutputs",
            "IndexReference",
            "IndexReferrer",
            "Refs",
            "ValidPaths",
        ] {
            assert!(names.iter().any(|x| x == n), "missing {n} in {names:?}");
        }
        // Opening again without `create` works and keeps the data.
        let id = db.insert_path(&row("/s/a")).unwrap();
        drop(db);
        let db = Db::open(&f, false).unwrap();
        assert_eq!(db.path_id("/s/a").unwrap(), Some(id));
        assert!(Db::open(&dir.path().join("absent.sqlite"), false).is_err());
    }

    #[test]
    fn path_row_with_references_reads_the_row_and_every_reference() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db.sqlite"), true).unwrap();
        let a = db.insert_path(&row("/s/a")).unwrap();
        let b = db.insert_path(&row("/s/b")).unwrap();
        let mut c_row = row("/s/c");
        c_row.deriver = Some("/s/c.drv".into());
        c_row.sigs = Some("k:1 k:2".into());
        c_row.ultimate = true;
        let c = db.insert_path(&c_row).unwrap();
        db.add_reference(c, a).unwrap();
        db.add_reference(c, b).unwrap();
        db.add_reference(c, c).unwrap();

        // No references: one row, and an empty list.
        let (got, refs) = db.path_row_with_references("/s/a").unwrap().unwrap();
        assert_eq!(
            got,
            PathRow {
                id: a,
                ..row("/s/a")
            }
        );
        assert!(refs.is_empty(), "{refs:?}");
        // Three references (one to itself), each once, with the row's own columns.
        let (got, mut refs) = db.path_row_with_references("/s/c").unwrap().unwrap();
        assert_eq!(got, PathRow { id: c, ..c_row });
        refs.sort();
        assert_eq!(refs, ["/s/a", "/s/b", "/s/c"]);
        assert_eq!(db.path_row_with_references("/s/absent").unwrap(), None);
    }

    #[test]
    fn foreign_keys_protect_referenced_rows_and_cascade() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db.sqlite"), true).unwrap();
        let a = db.insert_path(&row("/s/a")).unwrap();
        let b = db.insert_path(&row("/s/b")).unwrap();
        db.add_reference(b, a).unwrap();
        db.add_reference(b, b).unwrap();
        db.add_derivation_output(b, "out", "/s/o").unwrap();
        assert!(
            db.delete_path(a).is_err(),
            "deleted a path that is still referenced"
        );
        db.delete_path(b).unwrap(); // self reference removed by the trigger
        let refs: i64 = db
            .conn
            .query_row("select count(*) from Refs", [], |r| r.get(0))
            .unwrap();
        let outs: i64 = db
            .conn
            .query_row("select count(*) from DerivationOutputs", [], |r| r.get(0))
            .unwrap();
        assert_eq!((refs, outs), (0, 0));
        db.delete_path(a).unwrap();
    }

    /// Four rows: a <- b <- c, c also referring to itself and the deriver of an output
    /// `/s/o`; d refers to a.
    fn sample_rows(db: &Db) -> [i64; 4] {
        let [a, b, c, d] =
            ["/s/a", "/s/b", "/s/c", "/s/d"].map(|p| db.insert_path(&row(p)).unwrap());
        for (referrer, reference) in [(b, a), (c, b), (c, c), (d, a)] {
            db.add_reference(referrer, reference).unwrap();
        }
        db.add_derivation_output(c, "out", "/s/o").unwrap();
        [a, b, c, d]
    }

    #[test]
    fn delete_paths_takes_a_set_in_any_order_but_not_a_referenced_path() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db.sqlite"), true).unwrap();
        let count = |sql: &str| -> i64 { db.conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        // a <- b <- c, c refers to itself and has an output; d refers to a.
        let [a, b, c, d] = sample_rows(&db);
        // a is still referred to by d, outside the set: the whole transaction fails.
        let r = db.transaction("test", |db| db.delete_paths(&[a, b, c]));
        assert!(r.is_err(), "deleted a path that d still refers to");
        assert_eq!(count("select count(*) from ValidPaths"), 4);
        assert_eq!(count("select count(*) from Refs"), 4);
        // References first in the list, or last: both go.
        db.transaction("test", |db| db.delete_paths(&[b, c]))
            .unwrap();
        db.transaction("test", |db| db.delete_paths(&[a, d]))
            .unwrap();
        assert_eq!(count("select count(*) from ValidPaths"), 0);
        assert_eq!(count("select count(*) from Refs"), 0);
        assert_eq!(count("select count(*) from DerivationOutputs"), 0);
        db.transaction("test", |db| db.delete_paths(&[])).unwrap();
    }

    /// The set-based deletion without foreign keys and triggers leaves what the enforced
    /// one leaves, refuses what it refuses, and a database with a table of its own
    /// (here one with a cascade, as Nix's `Realisations`) gets the enforced deletion.
    #[test]
    fn invalidate_paths_keeps_the_rules_of_the_schema() {
        for extra_table in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let db = Db::open(&dir.path().join("db.sqlite"), true).unwrap();
            if extra_table {
                db.exec(
                    "create table Realisations (id integer primary key, outputPath integer not null, \
                     foreign key (outputPath) references ValidPaths(id) on delete cascade)",
                    "test",
                )
                .unwrap();
            }
            let count = |sql: &str| -> i64 { db.conn.query_row(sql, [], |r| r.get(0)).unwrap() };
            // a <- b <- c, c refers to itself and has an output; d refers to a.
            let [a, b, c, d] = sample_rows(&db);
            if extra_table {
                db.exec(
                    &format!("insert into Realisations (outputPath) values ({c})"),
                    "test",
                )
                .unwrap();
            }
            let e = db.invalidate_paths("test", &[a, b, c]).unwrap_err();
            assert!(
                matches!(&e.source, rusqlite::Error::SqliteFailure(f, Some(m))
                    if f.code == rusqlite::ErrorCode::ConstraintViolation && m.contains("FOREIGN KEY")),
                "{e}"
            );
            assert_eq!(count("select count(*) from ValidPaths"), 4);
            assert_eq!(count("select count(*) from Refs"), 4);
            assert_eq!(count("select count(*) from DerivationOutputs"), 1);
            db.invalidate_paths("test", &[c, b]).unwrap();
            assert_eq!(count("select count(*) from ValidPaths"), 2);
            assert_eq!(count("select count(*) from Refs"), 1);
            assert_eq!(count("select count(*) from DerivationOutputs"), 0);
            if extra_table {
                assert_eq!(count("select count(*) from Realisations"), 0);
            }
            // The connection enforces the rules again afterwards: a referenced row
            // cannot go, and the trigger still removes a self reference.
            assert!(db.delete_path(a).is_err());
            assert_eq!(count("pragma foreign_keys"), 1);
            let e2 = db.insert_path(&row("/s/e")).unwrap();
            db.add_reference(e2, e2).unwrap();
            db.delete_path(e2).unwrap();
            db.invalidate_paths("test", &[a, d]).unwrap();
            assert_eq!(count("select count(*) from ValidPaths"), 0);
            assert_eq!(count("select count(*) from Refs"), 0);
            db.invalidate_paths("test", &[]).unwrap();
        }
    }

    /// Keeping a set of rows deletes every other row up to the id given, with its
    /// references and derivation outputs, and leaves the kept rows as they were (ids, the
    /// autoincrement sequence, references between them); rows above that id are kept as
    /// if listed. A kept row referring to a row that would go stops it: nothing changes.
    /// Another schema is not touched either.
    #[test]
    fn keeping_some_rows_deletes_the_rest_and_keeps_the_rules() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db.sqlite"), true).unwrap();
        let count = |sql: &str| -> i64 { db.conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        let rows = |db: &Db| -> Vec<(i64, String, String)> {
            let mut s = db
                .conn
                .prepare("select id, path, hash from ValidPaths order by id")
                .unwrap();
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        // The sample (b and c to go), d with an output too, and e, come later, -> a.
        let [a, _, _, d] = sample_rows(&db);
        db.add_derivation_output(d, "out", "/s/p").unwrap();
        let e = db.insert_path(&row("/s/e")).unwrap();
        db.add_reference(e, a).unwrap();
        let before = rows(&db);

        // d and e are kept, but d refers to a, which would go.
        assert!(!db.keep_only_paths("test", &[d], d).unwrap());
        assert_eq!(rows(&db), before);
        assert_eq!(count("select count(*) from Refs"), 5);
        assert_eq!(count("select count(*) from DerivationOutputs"), 2);

        // Keep a and d (and e, registered "later"): b and c go.
        assert!(db.keep_only_paths("test", &[a, d], d).unwrap());
        let expected: Vec<_> = before
            .iter()
            .filter(|(id, _, _)| [a, d, e].contains(id))
            .cloned()
            .collect();
        assert_eq!(rows(&db), expected);
        assert_eq!(count("select count(*) from Refs"), 2);
        assert_eq!(
            count("select count(*) from Refs where reference = 1 and referrer in (4, 5)"),
            2
        );
        assert_eq!(count("select count(*) from DerivationOutputs"), 1);
        assert_eq!(count("select drv from DerivationOutputs"), d);
        assert_eq!(count("select count(*) from pragma_foreign_key_check"), 0);
        assert_eq!(
            count("select seq from sqlite_sequence where name = 'ValidPaths'"),
            e
        );
        // The rules hold again, and no temporary table is left.
        assert_eq!(count("pragma foreign_keys"), 1);
        assert!(db.delete_path(a).is_err());
        assert_eq!(count("select count(*) from temp.sqlite_master"), 0);
        let f = db.insert_path(&row("/s/f")).unwrap();
        assert!(f > e, "ids are not reused");

        // Another schema: left to the row by row deletion.
        db.exec(
            "create table Realisations (id integer primary key, outputPath integer not null, \
             foreign key (outputPath) references ValidPaths(id) on delete cascade)",
            "test",
        )
        .unwrap();
        assert!(!db.keep_only_paths("test", &[], f).unwrap());
        assert_eq!(count("select count(*) from ValidPaths"), 4);
    }

    #[test]
    fn failed_transaction_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db.sqlite"), true).unwrap();
        let r: Result<(), DbError> = db.transaction("test", |db| {
            db.insert_path(&row("/s/a"))?;
            // Duplicate path: violates the unique constraint.
            db.insert_path(&row("/s/a"))?;
            Ok(())
        });
        let e = r.unwrap_err();
        assert!(e.to_string().contains("registering /s/a"), "{e}");
        assert_eq!(db.path_id("/s/a").unwrap(), None);
    }
}
