//! Finding the smolvm engine (`$BOT_BOTTLE_SMOLVM`, `smolvm` on PATH, or the `smolmachines` PyPI package) and
//! reading its version. Trusts the `Host` seam; treats the engine's output as untrusted text.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::preflight::{FileKind, Host};

/// smolvm versions whose behaviour bot-bottle was checked against (research/smolvm.md); newest last.
pub const VERIFIED_SMOLVM_VERSIONS: &[&str] = &["1.32.2"];
/// Overrides discovery with an explicit engine binary.
pub const ENGINE_ENV: &str = "BOT_BOTTLE_SMOLVM";
/// The PyPI wheel's engine binary, next to `smol/__init__.py`.
const PYPI_ENGINE_NAME: &str = "smol-vmm";
/// Asks python3 where the `smol` package lives.
const PYTHON_LOCATE_SMOL: &str = "import smol, os; print(os.path.dirname(smol.__file__))";
/// Bound on `python3 -c …` (a cold import can be slow).
const PYTHON_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on `<engine> --version`.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the engine was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineSource {
    /// `$BOT_BOTTLE_SMOLVM`.
    Env,
    /// `smolvm` on `PATH`.
    Path,
    /// `smol-vmm` inside the `smolmachines` Python package.
    Pypi,
}

impl EngineSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Env => ENGINE_ENV,
            Self::Path => "PATH",
            Self::Pypi => "the smolmachines Python package",
        }
    }
}

/// A smolvm binary and the version it reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Engine {
    pub path: PathBuf,
    /// `X.Y.Z`, from `smolvm X.Y.Z`.
    pub version: String,
    pub source: EngineSource,
}

impl Engine {
    pub fn is_verified(&self) -> bool {
        VERIFIED_SMOLVM_VERSIONS.contains(&self.version.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{var} is set to {path}, which is not an executable file")]
    EnvPath { var: &'static str, path: PathBuf },
    #[error("no smolvm engine: {ENGINE_ENV} is unset, `smolvm` is not on PATH and python3 cannot import `smol`")]
    NotFound,
    #[error("the smolmachines package at {dir} has no executable {PYPI_ENGINE_NAME}")]
    PypiWithoutEngine { dir: PathBuf },
    #[error("could not run `{path} --version`")]
    Run {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{path} --version` printed no `smolvm X.Y.Z` line")]
    Version { path: PathBuf, output: String },
    #[error("{path} is smolvm {version}, which bot-bottle has not verified")]
    Unverified { path: PathBuf, version: String },
}

/// Finds the engine and reads its version; the version may be unverified (see `discover_verified`).
pub fn discover(host: &dyn Host) -> Result<Engine, EngineError> {
    let (path, source) = locate(host)?;
    let version = version(host, &path)?;
    Ok(Engine { path, version, source })
}

/// `discover`, refusing an engine whose version bot-bottle has not verified.
pub fn discover_verified(host: &dyn Host) -> Result<Engine, EngineError> {
    let engine = discover(host)?;
    if !engine.is_verified() {
        return Err(EngineError::Unverified {
            path: engine.path,
            version: engine.version,
        });
    }
    Ok(engine)
}

/// Where the engine is: `$BOT_BOTTLE_SMOLVM`, else `smolvm` on PATH, else `smol-vmm` in the PyPI package.
pub fn locate(host: &dyn Host) -> Result<(PathBuf, EngineSource), EngineError> {
    // An explicit setting is honoured or refused, never silently replaced by another engine.
    if let Some(value) = host.env(ENGINE_ENV).filter(|value| !value.is_empty()) {
        let path = PathBuf::from(value);
        if !is_executable(host, &path) {
            return Err(EngineError::EnvPath { var: ENGINE_ENV, path });
        }
        return Ok((path, EngineSource::Env));
    }
    if let Some(path) = host.which("smolvm") {
        return Ok((path, EngineSource::Path));
    }
    let dir = pypi_package_dir(host).ok_or(EngineError::NotFound)?;
    let path = dir.join(PYPI_ENGINE_NAME);
    if !is_executable(host, &path) {
        return Err(EngineError::PypiWithoutEngine { dir });
    }
    Ok((path, EngineSource::Pypi))
}

fn pypi_package_dir(host: &dyn Host) -> Option<PathBuf> {
    let python = host.which("python3")?;
    let out = host.run(&python, &["-c", PYTHON_LOCATE_SMOL], PYTHON_TIMEOUT).ok()?;
    let dir = PathBuf::from(out.stdout.trim());
    (out.success() && dir.is_absolute()).then_some(dir)
}

fn is_executable(host: &dyn Host, path: &Path) -> bool {
    host.metadata(path)
        .is_ok_and(|meta| meta.kind == FileKind::File && meta.mode & 0o111 != 0)
}

/// Runs `<engine> --version` and returns `X.Y.Z` from its `smolvm X.Y.Z` line. A binary named `smol-vmm` also prints
/// `note: no packed assets found …` on stderr on every run (research/smolvm.md §2.2); that line is ignored.
pub fn version(host: &dyn Host, path: &Path) -> Result<String, EngineError> {
    let out = host
        .run(path, &["--version"], VERSION_TIMEOUT)
        .map_err(|source| EngineError::Run {
            path: path.to_path_buf(),
            source,
        })?;
    let found = out.success().then(|| parse_version(&out.stdout)).flatten();
    found.ok_or_else(|| EngineError::Version {
        path: path.to_path_buf(),
        output: format!("{}{}", out.stdout, out.stderr).trim().to_owned(),
    })
}

fn parse_version(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|line| {
        let version = line.trim().strip_prefix("smolvm ")?;
        let parts: Vec<&str> = version.split('.').collect();
        let numeric = parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        numeric.then(|| version.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preflight::fake::{FakeHost, meta, output};

    const NOTE: &str = "note: no packed assets found for 'smol-vmm' (looked for a 'smol-vmm.smolmachine' sidecar \
                        next to the executable); running as the plain smolvm CLI.\n";

    fn pypi_host() -> FakeHost {
        let mut host = FakeHost::healthy();
        host.path.remove("smolvm");
        host.command(
            &format!("/usr/bin/python3 -c {PYTHON_LOCATE_SMOL}"),
            Ok(output(0, "/venv/lib/python3.12/site-packages/smol\n", "")),
        );
        host.file(
            "/venv/lib/python3.12/site-packages/smol/smol-vmm",
            meta(FileKind::File, 0o755, 0, 0),
        );
        host.command(
            "/venv/lib/python3.12/site-packages/smol/smol-vmm --version",
            Ok(output(0, "smolvm 1.32.2\n", NOTE)),
        );
        host
    }

    #[test]
    fn path_engine_is_found_with_its_version() {
        let engine = discover_verified(&FakeHost::healthy()).unwrap();
        assert_eq!(
            engine,
            Engine {
                path: "/usr/bin/smolvm".into(),
                version: "1.32.2".into(),
                source: EngineSource::Path
            }
        );
    }

    #[test]
    fn env_beats_path_and_a_bad_env_path_is_refused_not_skipped() {
        let mut host = FakeHost::healthy();
        host.set_env(ENGINE_ENV, "/opt/smolvm");
        assert!(matches!(locate(&host), Err(EngineError::EnvPath { .. })));
        host.file("/opt/smolvm", meta(FileKind::File, 0o755, 0, 0));
        assert_eq!(
            locate(&host).unwrap(),
            (PathBuf::from("/opt/smolvm"), EngineSource::Env)
        );
    }

    #[test]
    fn pypi_engine_is_found_and_its_stderr_note_ignored() {
        let engine = discover(&pypi_host()).unwrap();
        assert_eq!(engine.source, EngineSource::Pypi);
        assert_eq!(engine.version, "1.32.2");
    }

    #[test]
    fn pypi_package_without_the_binary_is_an_error() {
        let mut host = pypi_host();
        host.files
            .remove(Path::new("/venv/lib/python3.12/site-packages/smol/smol-vmm"));
        assert!(matches!(locate(&host), Err(EngineError::PypiWithoutEngine { .. })));
    }

    #[test]
    fn nothing_installed_is_not_found() {
        let mut host = FakeHost::healthy();
        host.path.remove("smolvm");
        host.command(
            &format!("/usr/bin/python3 -c {PYTHON_LOCATE_SMOL}"),
            Ok(output(1, "", "ModuleNotFoundError")),
        );
        assert!(matches!(discover(&host), Err(EngineError::NotFound)));
    }

    #[test]
    fn unverified_and_unparseable_versions_are_errors() {
        let mut host = FakeHost::healthy();
        host.command("/usr/bin/smolvm --version", Ok(output(0, "smolvm 1.40.0\n", "")));
        assert!(!discover(&host).unwrap().is_verified());
        assert!(
            matches!(discover_verified(&host), Err(EngineError::Unverified { version, .. }) if version == "1.40.0")
        );
        host.command("/usr/bin/smolvm --version", Ok(output(0, "krunvm 0.1\n", "")));
        assert!(matches!(discover(&host), Err(EngineError::Version { output, .. }) if output == "krunvm 0.1"));
    }

    #[test]
    fn version_lines_must_be_three_numbers() {
        assert_eq!(parse_version("smolvm 1.32.2\n"), Some("1.32.2".into()));
        assert_eq!(parse_version("smolvm 1.32\n"), None);
        assert_eq!(parse_version("smolvm 1.32.2-rc1\n"), None);
    }
}
