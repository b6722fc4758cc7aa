//! `bottle-probe`, the escape catalogue's attempts, built by cargo beside the bot-bottle binary under test (it is
//! another package's binary, so `cargo test -p bot-bottle` does not build it). `BOTTLE_PROBE=<path>` uses a
//! prebuilt one instead.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The probe for the bot-bottle binary at `bb` (same target directory and profile), built once per test process.
pub fn binary(bb: &str) -> &'static Path {
    static PROBE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PROBE.get_or_init(|| build(Path::new(bb))) {
        Ok(p) => p,
        Err(e) => panic!("the probe binary is not available: {e}"),
    }
}

fn build(bb: &Path) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("BOTTLE_PROBE") {
        return Ok(PathBuf::from(p));
    }
    let profile_dir = bb.parent().ok_or("no profile dir")?;
    let target_dir = profile_dir.parent().ok_or("no target dir")?;
    let profile = profile_dir
        .file_name()
        .and_then(OsStr::to_str)
        .ok_or("odd profile dir")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", "bottle-probe", "--target-dir"])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo build -p bottle-probe failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let probe = profile_dir.join("bottle-probe");
    if !probe.is_file() {
        return Err(format!("{} was not built", probe.display()));
    }
    Ok(probe)
}
