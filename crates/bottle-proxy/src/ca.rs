//! The bottle's CA: minted (ECDSA P-256) or loaded, and the leaf certificates it signs on demand for intercepted
//! hosts, cached as ready-made TLS server configurations. Trusts the files it is pointed at; trusts nothing else.

use std::collections::HashMap;
use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::decide::Target;

/// Names of the minted CA's files in the state dir (the key is 0600 and never leaves the host).
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The CA key: readable by the owner only, and created with that mode (never briefly world-readable).
const CA_KEY_MODE: u32 = 0o600;
const CA_CERT_MODE: u32 = 0o644;
const STATE_DIR_MODE: u32 = 0o700;
const CA_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Leaves live a week; the cache re-mints them after a day, so a cached leaf is never near expiry.
const LEAF_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const LEAF_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// Backdating absorbs clock skew between the host and the bottle (a VM's clock may lag).
const BACKDATE: Duration = Duration::from_secs(3600);
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot create the state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a usable CA key (a PKCS#8 PEM ECDSA key is expected; convert with `openssl pkcs8 -topk8 -nocrypt`)"
    )]
    BadKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("{path} is not a usable CA certificate")]
    BadCert {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("give both ca_cert and ca_key, or neither")]
    HalfGiven,
    #[error("an ephemeral CA is minted here; it cannot also come from ca_cert/ca_key")]
    EphemeralWithFiles,
    #[error("cannot mint a certificate")]
    Mint(#[source] rcgen::Error),
    #[error("cannot build a TLS configuration for a leaf certificate")]
    Tls(#[source] rustls::Error),
}

pub struct Ca {
    cert_pem: String,
    cert_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// One key for every leaf: minting a key per host would cost more than it protects (all leaves are
    /// equally trusted by the bottle and live in this process).
    leaf_key: KeyPair,
    provider: Arc<CryptoProvider>,
    cache: Mutex<HashMap<String, (Instant, Arc<ServerConfig>)>>,
    max_entries: usize,
}

impl Ca {
    /// Loads `cert`+`key` when given; otherwise reuses `STATE_DIR/ca.pem`+`ca-key.pem` or mints them there.
    pub fn load_or_mint(
        state_dir: &Path,
        cert: Option<&Path>,
        key: Option<&Path>,
        bottle: &str,
        provider: Arc<CryptoProvider>,
        max_entries: usize,
    ) -> Result<Self, CaError> {
        let (cert_path, key_path) = match (cert, key) {
            (Some(c), Some(k)) => (c.to_path_buf(), k.to_path_buf()),
            (None, None) => {
                ensure_state_dir(state_dir)?;
                let (c, k) = (state_dir.join(CA_CERT_FILE), state_dir.join(CA_KEY_FILE));
                if !c.exists() || !k.exists() {
                    mint_ca(&c, &k, bottle)?;
                }
                (c, k)
            }
            _ => return Err(CaError::HalfGiven),
        };
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CaError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        warn_if_exposed(&key_path);
        let cert_pem = read(&cert_path)?;
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(|source| CaError::BadKey {
            path: key_path.clone(),
            source,
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| CaError::BadCert {
            path: cert_path.clone(),
            source,
        })?;
        Self::with_issuer(cert_pem, cert_path, issuer, provider, max_entries)
    }

    /// Mints a CA whose key exists only in this process (a bottle's proxy lives exactly as long as its bottle);
    /// only the certificate is written, as `STATE_DIR/ca.pem`, for the bottle and the user to trust.
    pub fn mint_ephemeral(
        state_dir: &Path,
        bottle: &str,
        provider: Arc<CryptoProvider>,
        max_entries: usize,
    ) -> Result<Self, CaError> {
        ensure_state_dir(state_dir)?;
        let (key, cert_pem) = mint(bottle)?;
        let cert_path = state_dir.join(CA_CERT_FILE);
        write_new(&cert_path, cert_pem.as_bytes(), CA_CERT_MODE)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| CaError::BadCert {
            path: cert_path.clone(),
            source,
        })?;
        Self::with_issuer(cert_pem, cert_path, issuer, provider, max_entries)
    }

    fn with_issuer(
        cert_pem: String,
        cert_path: PathBuf,
        issuer: Issuer<'static, KeyPair>,
        provider: Arc<CryptoProvider>,
        max_entries: usize,
    ) -> Result<Self, CaError> {
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Mint)?;
        Ok(Self {
            cert_pem,
            cert_path,
            issuer,
            leaf_key,
            provider,
            cache: Mutex::new(HashMap::new()),
            max_entries: max_entries.max(1),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// A server configuration presenting a leaf for `target`, offering ALPN `h2` and `http/1.1`.
    pub fn server_config(&self, target: &Target) -> Result<Arc<ServerConfig>, CaError> {
        let key = target.to_string();
        if let Ok(cache) = self.cache.lock()
            && let Some((minted, cfg)) = cache.get(&key)
            && minted.elapsed() < LEAF_REFRESH
        {
            return Ok(Arc::clone(cfg));
        }
        // Minted outside the lock: two racing handshakes for one new host both mint; one result is kept.
        let cfg = Arc::new(self.mint_leaf(target)?);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= self.max_entries {
                cache.retain(|_, (minted, _)| minted.elapsed() < LEAF_REFRESH);
            }
            if cache.len() >= self.max_entries
                && let Some(victim) = cache.keys().next().cloned()
            {
                cache.remove(&victim);
            }
            cache.insert(key, (Instant::now(), Arc::clone(&cfg)));
        }
        Ok(cfg)
    }

    fn mint_leaf(&self, target: &Target) -> Result<ServerConfig, CaError> {
        let san = match target {
            Target::Name(n) => n.to_string(),
            Target::Ip(ip) => ip.to_string(),
        };
        let mut params = CertificateParams::new(vec![san.clone()]).map_err(CaError::Mint)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, san);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + LEAF_CERT_TTL;
        let cert = params.signed_by(&self.leaf_key, &self.issuer).map_err(CaError::Mint)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let mut cfg = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(CaError::Tls)?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .map_err(CaError::Tls)?;
        cfg.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        Ok(cfg)
    }
}

fn ensure_state_dir(dir: &Path) -> Result<(), CaError> {
    DirBuilder::new()
        .recursive(true)
        .mode(STATE_DIR_MODE)
        .create(dir)
        .map_err(|source| CaError::StateDir {
            path: dir.to_path_buf(),
            source,
        })
}

fn mint_ca(cert_path: &Path, key_path: &Path, bottle: &str) -> Result<(), CaError> {
    let (key, cert_pem) = mint(bottle)?;
    // Key first: a certificate on disk without its key would be reused as a half-CA on the next start.
    write_new(key_path, key.serialize_pem().as_bytes(), CA_KEY_MODE)?;
    write_new(cert_path, cert_pem.as_bytes(), CA_CERT_MODE)
}

/// A fresh CA key and its self-signed certificate (PEM), constrained to sign leaves only.
fn mint(bottle: &str) -> Result<(KeyPair, String), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Mint)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "bot-bottle");
    dn.push(DnType::CommonName, format!("bot-bottle CA ({bottle})"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_CERT_TTL;
    let cert = params.self_signed(&key).map_err(CaError::Mint)?;
    Ok((key, cert.pem()))
}

/// SECURITY: the file is created with its final mode (O_CREAT with mode, then renamed into place), so the key is
/// never readable by others, not even between create and chmod. Not fsynced: the rename keeps readers from a
/// half-written file, and a CA torn by a power loss fails to load with a precise error (never half-trusted); the
/// sync cost 1–3 ms on every bottle launch.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let err = |source| CaError::Write {
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn warn_if_exposed(key_path: &Path) {
    if let Ok(meta) = std::fs::metadata(key_path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %key_path.display(), "the CA key is readable by other users; chmod 600 it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    #[test]
    fn minted_ca_files_have_safe_modes_and_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let ca = Ca::load_or_mint(&state, None, None, "t", provider(), 4).unwrap();
        let key_mode = std::fs::metadata(state.join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let again = Ca::load_or_mint(&state, None, None, "t", provider(), 4).unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());
    }

    #[test]
    fn leaves_are_cached_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_mint(dir.path(), None, None, "t", provider(), 2).unwrap();
        let a = Target::parse("a.example.com").unwrap();
        let first = ca.server_config(&a).unwrap();
        assert!(Arc::ptr_eq(&first, &ca.server_config(&a).unwrap()));
        for h in ["b.example.com", "c.example.com", "127.0.0.1"] {
            ca.server_config(&Target::parse(h).unwrap()).unwrap();
        }
        assert!(ca.cache.lock().unwrap().len() <= 2);
    }

    #[test]
    fn an_ephemeral_ca_writes_its_certificate_and_never_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let ca = Ca::mint_ephemeral(&state, "t", provider(), 4).unwrap();
        assert_eq!(
            std::fs::read_to_string(state.join(CA_CERT_FILE)).unwrap(),
            ca.cert_pem()
        );
        let files: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, [CA_CERT_FILE]);
        // It signs: a leaf for a host.
        ca.server_config(&Target::parse("a.example.com").unwrap()).unwrap();
    }

    #[test]
    fn half_a_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Ca::load_or_mint(dir.path(), Some(&dir.path().join("c")), None, "t", provider(), 2);
        assert!(matches!(err, Err(CaError::HalfGiven)));
    }
}
