//! smolvm's state database as bot-bottle reads it: where it is, and whether one machine's row really confines the
//! guest the way the plan says. Trusts SQLite; trusts nothing in the row (it is plain JSON any local root can edit,
//! and a `.smolmachine` pack silently drops allow lists, research/smolvm.md §1.5).
//!
//! smolvm 1.32.2 keeps each machine as `vms(name TEXT PRIMARY KEY, data BLOB)` with `data` the UTF-8 JSON record
//! (research/smolvm.md §1.2). smolvm reads the row again at every start (§1.6), so the row is the configuration that
//! will be enforced; `machine ls --json` shows only part of it.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde_json::{Map, Value, json};

use super::plan::{ExpectedEgress, VIRTIO_NET};

/// The database file under smolvm's data directory.
const DB_UNDER_DATA_DIR: &str = "smolvm/server/smolvm.db";
/// How long to wait for smolvm's own transactions (it uses `BEGIN IMMEDIATE`, research/smolvm.md §1.6).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Machine states in which smolvm is not holding the configuration: patching is meaningful and safe.
const PATCHABLE_STATES: &[&str] = &["created", "stopped"];

/// Keys of a 1.32.2 row that do not decide where the guest's traffic or data can go. Every other key is either
/// checked (`rules`) or unknown, and an unknown key is refused: bot-bottle does not guess what it means.
const INERT_FIELDS: &[&str] = &[
    "block_io",
    "checkpoint_head",
    "cmd",
    "cpus",
    "created_at",
    "credentials_supplied_by_api",
    "cuda_fork_pool_size",
    "cuda_preload_modules",
    "cuda_vram_limit_mib",
    "disk_durability",
    "disk_volumes",
    "dns_options",
    "entrypoint",
    "env",
    "ephemeral",
    "fork_generation",
    "fork_lineage_pid_start_time",
    "fork_overlay_owner",
    "forkpoint_held",
    "gpu_vram_mib",
    "health_cmd",
    "health_interval_secs",
    "health_retries",
    "health_startup_grace_secs",
    "health_timeout_secs",
    "host_uid_owner",
    "image",
    "image_origin",
    "image_origin_digest",
    "init",
    "init_completed",
    "keep_identity",
    "last_exit_code",
    "mem",
    "overlay_gb",
    "packed_image_on_storage",
    "pause_reason",
    "paused_checkpoint",
    "pid",
    "pid_start_time",
    "restart",
    "rosetta",
    "runtime_managed",
    "shm_size",
    "source_registry_ref",
    "staged_mounts_detached_from",
    "state",
    "stop_on_exit",
    "stop_signal",
    "stop_timeout_secs",
    "storage_gb",
    "user",
    "workdir",
];

#[derive(Debug, thiserror::Error)]
pub enum DbPathError {
    #[error("smolvm's state directory {path} is relative; pass an absolute --state-dir")]
    RelativeStateDir { path: PathBuf },
    #[error("cannot locate smolvm's database: neither an absolute XDG_DATA_HOME nor an absolute HOME is set")]
    NoHome,
    #[error("--state-dir is Linux only; smolvm on this platform keeps its state under HOME")]
    StateDirUnsupported,
}

/// A refusal to let a machine start, naming the database and (where one is at fault) the field.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("smolvm's database {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot open smolvm's database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<rusqlite::Error>,
    },
    #[error("cannot read machine {machine} from {path}")]
    Read {
        path: PathBuf,
        machine: String,
        #[source]
        source: Box<rusqlite::Error>,
    },
    #[error("machine {machine} has no row in {path}")]
    RowMissing { path: PathBuf, machine: String },
    #[error("machine {machine} in {path}: vms.data is {found}, not a BLOB (smolvm itself cannot read such a row)")]
    NotBlob {
        path: PathBuf,
        machine: String,
        found: String,
    },
    #[error("machine {machine} in {path}: vms.data is not a JSON object: {reason}")]
    NotJson {
        path: PathBuf,
        machine: String,
        reason: String,
    },
    #[error(
        "machine {machine} in {path} has field `{field}`, which smolvm 1.32.2 rows do not have; refusing to guess \
         what it does"
    )]
    UnknownField {
        path: PathBuf,
        machine: String,
        field: String,
    },
    #[error("machine {machine} in {path} does not confine egress: {}", list(mismatches))]
    Mismatch {
        path: PathBuf,
        machine: String,
        mismatches: Vec<FieldMismatch>,
    },
    #[error("machine {machine} in {path} is {state}; its row is only patched while it is created or stopped")]
    NotPatchable {
        path: PathBuf,
        machine: String,
        state: String,
    },
    #[error("cannot patch field `{field}` of machine {machine} in {path}")]
    Patch {
        path: PathBuf,
        machine: String,
        field: &'static str,
        #[source]
        source: Box<rusqlite::Error>,
    },
    #[error(
        "machine {machine} in {path} still does not confine egress after patching: {}",
        list(mismatches)
    )]
    PatchDidNotHold {
        path: PathBuf,
        machine: String,
        mismatches: Vec<FieldMismatch>,
    },
}

impl DbError {
    /// The fields at fault, for `Mismatch` and `PatchDidNotHold`.
    pub fn mismatched_fields(&self) -> Vec<&'static str> {
        match self {
            Self::Mismatch { mismatches, .. } | Self::PatchDidNotHold { mismatches, .. } => {
                mismatches.iter().map(|m| m.field).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// What one field must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// Present with exactly this JSON value.
    Value(Value),
    /// Not present at all (smolvm omits these keys when unset, research/smolvm.md §1.3).
    Absent,
}

impl fmt::Display for Want {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value(value) => write!(f, "{value}"),
            Self::Absent => f.write_str("absent"),
        }
    }
}

/// One checked field of the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRule {
    pub field: &'static str,
    pub want: Want,
}

/// A field whose value is not what the plan requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldMismatch {
    pub field: &'static str,
    /// The row's value, or `None` when the key is absent.
    pub found: Option<Value>,
    pub want: Want,
}

impl fmt::Display for FieldMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.found {
            Some(found) => write!(f, "`{}` is {found}, must be {}", self.field, self.want),
            None => write!(f, "`{}` is absent, must be {}", self.field, self.want),
        }
    }
}

fn list(mismatches: &[FieldMismatch]) -> String {
    mismatches
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A row that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The machine state the row records (`created`, `stopped`, `running`, …).
    pub state: String,
    /// Fields `verify_or_patch` rewrote before the row verified (empty for `verify`).
    pub patched: Vec<&'static str>,
}

/// The database smolvm uses for `state_dir` (or, without one, for the scrubbed environment `env` it is given):
/// `<state-dir>/.local/share/smolvm/server/smolvm.db`, else `$XDG_DATA_HOME/smolvm/server/smolvm.db`, else
/// `$HOME/.local/share/smolvm/server/smolvm.db` (research/smolvm.md §1.1). `SMOLVM_DATA_DIR` is not consulted:
/// `cli.rs` never passes it to smolvm.
pub fn db_path(state_dir: Option<&Path>, env: &[(OsString, OsString)]) -> Result<PathBuf, DbPathError> {
    let var = |key: &str| {
        env.iter()
            .find(|(k, _)| k == OsStr::new(key))
            .map(|(_, v)| PathBuf::from(v))
            // XDG Base Directory: relative values are invalid and ignored; the same goes for HOME here.
            .filter(|p| p.is_absolute())
    };
    if let Some(dir) = state_dir {
        if cfg!(target_os = "macos") {
            return Err(DbPathError::StateDirUnsupported);
        }
        if !dir.is_absolute() {
            return Err(DbPathError::RelativeStateDir {
                path: dir.to_path_buf(),
            });
        }
        return Ok(dir.join(".local/share").join(DB_UNDER_DATA_DIR));
    }
    if cfg!(target_os = "macos") {
        // The platform data dir smolvm's Rust `dirs` lookup gives on macOS [unverified on a Mac].
        let home = var("HOME").ok_or(DbPathError::NoHome)?;
        return Ok(home.join("Library/Application Support").join(DB_UNDER_DATA_DIR));
    }
    if let Some(data) = var("XDG_DATA_HOME") {
        return Ok(data.join(DB_UNDER_DATA_DIR));
    }
    let home = var("HOME").ok_or(DbPathError::NoHome)?;
    Ok(home.join(".local/share").join(DB_UNDER_DATA_DIR))
}

/// Every checked field of a 1.32.2 row and the value the plan requires. Keys smolvm omits when unset must stay
/// absent; keys it always writes must hold their "off" value.
pub fn rules(expected: &ExpectedEgress) -> Vec<FieldRule> {
    let value = |field, value| FieldRule {
        field,
        want: Want::Value(value),
    };
    let absent = |field| FieldRule {
        field,
        want: Want::Absent,
    };
    let mounts: Vec<Value> = expected
        .mounts
        .iter()
        .map(|m| json!([m.host, m.guest, m.read_only]))
        .collect();
    vec![
        value("name", json!(expected.machine.as_str())),
        value("labels", json!(expected.labels)),
        // SECURITY: networking through smolvm's virtio-net stack, admitting only the gateway, and handing every
        // admitted TCP flow to the bottle proxy. Each of these, changed, opens a path around the proxy.
        value("network", json!(true)),
        value("network_backend", json!(VIRTIO_NET)),
        value("external_interceptor_required", json!(true)),
        value("allowed_cidrs", json!(expected.allowed_cidrs)),
        value("dns_filter_hosts", json!(expected.dns_filter_hosts)),
        // Rules that come before the allow list (`--allow-udp`, DB-injected TCP allows) or change its meaning.
        absent("egress_rules"),
        absent("block_private"),
        // The gateway is 100.96.0.1 only on the default subnet; a named network joins other machines.
        absent("guest_subnet"),
        absent("network_name"),
        absent("dns"),
        // smolvm's own credential injection: an HTTPS MITM on the host that bypasses the bottle proxy.
        absent("credential_policy"),
        absent("credential_placeholders"),
        // Host data and host channels reaching the guest without the network.
        value("mounts", Value::Array(mounts)),
        value("staged_mounts", json!([])),
        value("remote_volumes", json!([])),
        value("published_sockets", json!([])),
        value("ports", json!([])),
        absent("udp_ports"),
        absent("disks"),
        absent("cache_disk"),
        absent("secret_refs"),
        value("ssh_agent", json!(false)),
        value("docker_socket", json!(false)),
        value("cuda", json!(false)),
        value("gpu", Value::Null),
        value("nested_virt", Value::Null),
        // A machine created from a pack carries the pack's (allow-list-free) network settings.
        absent("source_smolmachine"),
    ]
}

/// Opens the database read-only and checks the machine's row against `expected`.
pub fn verify(db: &Path, expected: &ExpectedEgress) -> Result<Verified, DbError> {
    let conn = open(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let row = read_row(&conn, db, expected)?;
    let mismatches = check(&row, db, expected)?;
    if !mismatches.is_empty() {
        return Err(DbError::Mismatch {
            path: db.to_path_buf(),
            machine: expected.machine.to_string(),
            mismatches,
        });
    }
    Ok(Verified {
        state: state(&row),
        patched: Vec::new(),
    })
}

/// `verify`; on field mismatches only, rewrites exactly those fields with `json_set`/`json_remove` on the BLOB in
/// one `BEGIN IMMEDIATE` transaction (the only time the database is opened read-write), then verifies again from a
/// fresh read-only connection. A missing database or row, a non-BLOB or non-JSON row and unknown fields are refused,
/// never repaired.
pub fn verify_or_patch(db: &Path, expected: &ExpectedEgress) -> Result<Verified, DbError> {
    match verify(db, expected) {
        Err(DbError::Mismatch { .. }) => {}
        other => return other,
    }
    let patched = patch(db, expected)?;
    match verify(db, expected) {
        Ok(verified) => Ok(Verified { patched, ..verified }),
        Err(DbError::Mismatch {
            path,
            machine,
            mismatches,
        }) => Err(DbError::PatchDidNotHold {
            path,
            machine,
            mismatches,
        }),
        Err(other) => Err(other),
    }
}

fn patch(db: &Path, expected: &ExpectedEgress) -> Result<Vec<&'static str>, DbError> {
    let machine = expected.machine.as_str();
    let mut conn = open(db, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    let read_err = |source| DbError::Read {
        path: db.to_path_buf(),
        machine: machine.to_owned(),
        source: Box::new(source),
    };
    // A crash right after our commit must not lose the patch that the next start relies on.
    conn.pragma_update(None, "synchronous", "FULL").map_err(read_err)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(read_err)?;
    // Re-read under the write lock: smolvm may have written the row since `verify` looked.
    let row = read_row(&tx, db, expected)?;
    let state = state(&row);
    if !PATCHABLE_STATES.contains(&state.as_str()) {
        return Err(DbError::NotPatchable {
            path: db.to_path_buf(),
            machine: machine.to_owned(),
            state,
        });
    }
    let mismatches = check(&row, db, expected)?;
    for mismatch in &mismatches {
        let path = format!("$.{}", mismatch.field);
        // CAST to TEXT first: SQLite ≥ 3.45 reads a BLOB argument to the JSON functions as JSONB. CAST back so the
        // column keeps BLOB affinity, which is all smolvm can read (research/smolvm.md §1.6).
        let changed = match &mismatch.want {
            Want::Value(value) => tx.execute(
                "UPDATE vms SET data = CAST(json_set(CAST(data AS TEXT), ?1, json(?2)) AS BLOB) WHERE name = ?3",
                rusqlite::params![path, value.to_string(), machine],
            ),
            Want::Absent => tx.execute(
                "UPDATE vms SET data = CAST(json_remove(CAST(data AS TEXT), ?1) AS BLOB) WHERE name = ?2",
                rusqlite::params![path, machine],
            ),
        };
        let patch_err = |source| DbError::Patch {
            path: db.to_path_buf(),
            machine: machine.to_owned(),
            field: mismatch.field,
            source: Box::new(source),
        };
        match changed {
            Ok(1) => {}
            Ok(_) => return Err(patch_err(rusqlite::Error::QueryReturnedNoRows)),
            Err(source) => return Err(patch_err(source)),
        }
        tracing::info!(machine, field = mismatch.field, "patched smolvm row");
    }
    tx.commit().map_err(read_err)?;
    Ok(mismatches.iter().map(|m| m.field).collect())
}

fn open(db: &Path, mode: OpenFlags) -> Result<Connection, DbError> {
    // Checked first so that a missing database is named as such; OPEN_CREATE is never passed either way.
    if !db.is_file() {
        return Err(DbError::Missing { path: db.to_path_buf() });
    }
    let open_err = |source| DbError::Open {
        path: db.to_path_buf(),
        source: Box::new(source),
    };
    let conn = Connection::open_with_flags(db, mode | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    Ok(conn)
}

/// The row's JSON object, refusing anything smolvm 1.32.2 would not have written.
fn read_row(conn: &Connection, db: &Path, expected: &ExpectedEgress) -> Result<Map<String, Value>, DbError> {
    let machine = expected.machine.as_str();
    let found: Option<(String, Option<Vec<u8>>)> = conn
        .query_row(
            "SELECT typeof(data), CASE WHEN typeof(data) = 'blob' THEN data END FROM vms WHERE name = ?1",
            [machine],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()
        .map_err(|source| DbError::Read {
            path: db.to_path_buf(),
            machine: machine.to_owned(),
            source: Box::new(source),
        })?;
    let Some((kind, bytes)) = found else {
        return Err(DbError::RowMissing {
            path: db.to_path_buf(),
            machine: machine.to_owned(),
        });
    };
    let Some(bytes) = bytes else {
        return Err(DbError::NotBlob {
            path: db.to_path_buf(),
            machine: machine.to_owned(),
            found: kind,
        });
    };
    let not_json = |reason: String| DbError::NotJson {
        path: db.to_path_buf(),
        machine: machine.to_owned(),
        reason,
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(not_json(format!("it is a JSON {}", kind_of(&other)))),
        Err(err) => Err(not_json(err.to_string())),
    }
}

/// Every mismatched checked field, in rule order; an unknown key is an error before anything is compared.
fn check(row: &Map<String, Value>, db: &Path, expected: &ExpectedEgress) -> Result<Vec<FieldMismatch>, DbError> {
    let rules = rules(expected);
    let checked: BTreeSet<&str> = rules.iter().map(|r| r.field).collect();
    if let Some(field) = row
        .keys()
        .find(|k| !checked.contains(k.as_str()) && !INERT_FIELDS.contains(&k.as_str()))
    {
        return Err(DbError::UnknownField {
            path: db.to_path_buf(),
            machine: expected.machine.to_string(),
            field: field.clone(),
        });
    }
    Ok(rules
        .into_iter()
        .filter_map(|rule| {
            let found = row.get(rule.field);
            let ok = match (&rule.want, found) {
                (Want::Value(want), Some(found)) => want == found,
                (Want::Absent, None) => true,
                _ => false,
            };
            (!ok).then(|| FieldMismatch {
                field: rule.field,
                found: found.cloned(),
                want: rule.want,
            })
        })
        .collect())
}

fn state(row: &Map<String, Value>) -> String {
    row.get("state").and_then(Value::as_str).unwrap_or("unknown").to_owned()
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::super::plan::{self, InterceptorToken, MachineSpec};
    use super::*;
    use bottle_policy::BottleName;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    #[cfg(not(target_os = "macos"))]
    #[test]
    fn db_path_follows_state_dir_then_xdg_then_home() {
        let all = env(&[("HOME", "/home/me"), ("XDG_DATA_HOME", "/xdg")]);
        assert_eq!(
            db_path(Some(Path::new("/s")), &all).unwrap(),
            Path::new("/s/.local/share/smolvm/server/smolvm.db")
        );
        assert_eq!(db_path(None, &all).unwrap(), Path::new("/xdg/smolvm/server/smolvm.db"));
        let relative_xdg = env(&[("HOME", "/home/me"), ("XDG_DATA_HOME", "rel")]);
        assert_eq!(
            db_path(None, &relative_xdg).unwrap(),
            Path::new("/home/me/.local/share/smolvm/server/smolvm.db")
        );
        assert!(matches!(db_path(None, &[]), Err(DbPathError::NoHome)));
        assert!(matches!(
            db_path(Some(Path::new("s")), &all),
            Err(DbPathError::RelativeStateDir { .. })
        ));
    }

    fn expected() -> ExpectedEgress {
        let spec = MachineSpec {
            bottle: BottleName::parse("demo").unwrap(),
            image: None,
            cpus: None,
            memory_mib: None,
            workspace: None,
            shares: Vec::new(),
            interceptor: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 3128),
            token: InterceptorToken::from_bytes([1; 32]).unwrap(),
        };
        plan::plan(spec).unwrap().expected().clone()
    }

    /// The row `machine create` writes for the plan (captured from smolvm 1.32.2), plus the interceptor flag.
    fn good_row() -> Map<String, Value> {
        let text = r#"{"name":"bb-demo","created_at":1795333889,"state":"created","pid":null,"pid_start_time":null,
            "cpus":4,"mem":8192,"block_io":"sync","disk_durability":"full","mounts":[],"staged_mounts":[],
            "staged_mounts_detached_from":null,"ports":[],"published_sockets":[],"network":true,"gpu":null,
            "nested_virt":null,"gpu_vram_mib":null,"rosetta":null,"restart":{"policy":"never","max_retries":0,
            "max_backoff_secs":0,"restart_count":0,"user_stopped":false},"last_exit_code":null,"init":[],
            "init_completed":false,"remote_volumes":[],"env":[],"workdir":null,"storage_gb":null,"overlay_gb":null,
            "allowed_cidrs":["100.96.0.1/32"],"network_backend":"virtio-net","image":null,"entrypoint":[],"cmd":[],
            "labels":{"bottle":"demo","owner":"bot-bottle"},"health_cmd":null,"health_interval_secs":null,
            "health_timeout_secs":null,"health_retries":null,"health_startup_grace_secs":null,"ssh_agent":false,
            "cuda":false,"docker_socket":false,"dns_filter_hosts":["=no-dns.invalid"],"ephemeral":false,
            "runtime_managed":false,"external_interceptor_required":true}"#;
        serde_json::from_str(text).unwrap()
    }

    fn fields(row: &Map<String, Value>) -> Vec<&'static str> {
        check(row, Path::new("/db"), &expected())
            .unwrap()
            .iter()
            .map(|m| m.field)
            .collect()
    }

    #[test]
    fn the_created_row_passes() {
        assert!(fields(&good_row()).is_empty());
    }

    #[test]
    fn every_widening_is_a_named_mismatch() {
        let cases: Vec<(&str, Option<Value>)> = vec![
            ("allowed_cidrs", Some(Value::Null)),
            ("allowed_cidrs", Some(json!(["100.96.0.1/32", "0.0.0.0/0"]))),
            ("external_interceptor_required", None),
            ("external_interceptor_required", Some(json!(false))),
            ("network_backend", Some(json!("tsi"))),
            ("network_backend", None),
            ("dns_filter_hosts", None),
            (
                "egress_rules",
                Some(json!([{"transport": "tcp", "cidr": "0.0.0.0/0", "action": "allow"}])),
            ),
            ("block_private", Some(json!([]))),
            ("guest_subnet", Some(json!("10.200.0.0/30"))),
            (
                "published_sockets",
                Some(json!([{"direction": "mount", "guest_path": "/g", "host_path": "/h"}])),
            ),
            ("mounts", Some(json!([["/", "/host", false]]))),
            ("credential_policy", Some(json!({"credentials": []}))),
            ("ssh_agent", Some(json!(true))),
            ("secret_refs", Some(json!({"A": {"from_file": "/etc/shadow"}}))),
            ("source_smolmachine", Some(json!("/x.smolmachine"))),
        ];
        for (field, value) in cases {
            let mut row = good_row();
            match &value {
                Some(value) => row.insert(field.to_owned(), value.clone()),
                None => row.remove(field),
            };
            assert_eq!(fields(&row), [field], "{field} = {value:?}");
        }
    }

    #[test]
    fn unknown_fields_are_refused_not_ignored() {
        let mut row = good_row();
        row.insert("allow_everything".into(), json!(true));
        let err = check(&row, Path::new("/db"), &expected()).unwrap_err();
        assert!(matches!(err, DbError::UnknownField { ref field, .. } if field == "allow_everything"));
        assert!(err.to_string().contains("/db"), "{err}");
    }

    #[test]
    fn mismatch_messages_name_the_database_and_each_field() {
        let err = DbError::Mismatch {
            path: "/s/smolvm.db".into(),
            machine: "bb-demo".into(),
            mismatches: vec![
                FieldMismatch {
                    field: "allowed_cidrs",
                    found: Some(Value::Null),
                    want: Want::Value(json!(["100.96.0.1/32"])),
                },
                FieldMismatch {
                    field: "egress_rules",
                    found: Some(json!([])),
                    want: Want::Absent,
                },
            ],
        };
        assert_eq!(
            err.to_string(),
            "machine bb-demo in /s/smolvm.db does not confine egress: `allowed_cidrs` is null, must be \
             [\"100.96.0.1/32\"]; `egress_rules` is [], must be absent"
        );
        assert_eq!(err.mismatched_fields(), ["allowed_cidrs", "egress_rules"]);
    }

    #[test]
    fn checked_and_inert_fields_do_not_overlap() {
        for rule in rules(&expected()) {
            assert!(!INERT_FIELDS.contains(&rule.field), "{}", rule.field);
        }
    }
}
