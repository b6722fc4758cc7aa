//! A CA minted in the test, written to `<dir>/<stem>.pem` (and `<stem>-key.pem`, PKCS#8), and leaves it signs for
//! local upstreams. Never a committed key: each test run mints its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate chain and its key, ready for rustls.
pub type Leaf = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

pub struct TestCa {
    pub cert_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    /// Mints a CA named `common_name` and writes it to `<dir>/<stem>.pem` and `<dir>/<stem>-key.pem`.
    pub fn mint(dir: &Path, stem: &str, common_name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, common_name);
        let cert = params.self_signed(&key).unwrap();
        let cert_path = dir.join(format!("{stem}.pem"));
        let key_path = dir.join(format!("{stem}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        Self {
            cert_pem: cert.pem(),
            cert_path,
            key_path,
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `names` (DNS names or IP literals), signed by this CA.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
        )
    }
}

impl TestCa {
    /// A leaf for `names`, written as PEM to `<dir>/<stem>.pem` and `<dir>/<stem>-key.pem`, for a server that is not
    /// rustls (a fake API in another language). Returns (certificate, key) paths.
    pub fn leaf_files(&self, dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let (cert_path, key_path) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}-key.pem")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

/// A rustls server configuration (ring) presenting `leaf` and offering `alpn`, in order of preference.
pub fn server_config(leaf: &Leaf, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(leaf.0.clone(), leaf.1.clone_key())
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}
