//! A minimal TLS 1.3 ClientHello (RFC 8446 §4.1.2) naming a chosen SNI: enough for a proxy or a server to decide
//! whether to answer with a ServerHello. The key share is random bytes; no handshake is ever completed.

/// TLS record content type for handshake messages, and the handshake type of a ServerHello (RFC 8446 §5.1, §4).
pub const CONTENT_HANDSHAKE: u8 = 0x16;
pub const CONTENT_ALERT: u8 = 0x15;

fn u16_len(len: usize) -> [u8; 2] {
    u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes()
}

fn extension(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&u16_len(body.len()));
    out.extend_from_slice(body);
}

fn random<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // A fixed pattern is as good as random here: nothing is ever encrypted with it.
    if rustix::rand::getrandom(&mut buf, rustix::rand::GetRandomFlags::empty()).is_err() {
        buf.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    }
    buf
}

/// One TLS record holding a ClientHello for `sni`, offering TLS 1.3 and 1.2, ALPN h2 and http/1.1.
pub fn client_hello(sni: &str) -> Vec<u8> {
    let mut ext = Vec::new();
    // server_name: list of one host_name entry.
    let mut names = vec![0u8];
    names.extend_from_slice(&u16_len(sni.len()));
    names.extend_from_slice(sni.as_bytes());
    let mut sn = u16_len(names.len()).to_vec();
    sn.extend_from_slice(&names);
    extension(&mut ext, 0x0000, &sn);
    // supported_groups: x25519, secp256r1.
    extension(&mut ext, 0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]);
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256, ed25519.
    extension(
        &mut ext,
        0x000d,
        &[0, 8, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, 0x08, 0x07],
    );
    // ALPN: h2, http/1.1.
    extension(&mut ext, 0x0010, b"\x00\x0c\x02h2\x08http/1.1");
    // supported_versions: TLS 1.3, TLS 1.2.
    extension(&mut ext, 0x002b, &[4, 0x03, 0x04, 0x03, 0x03]);
    // key_share: one x25519 entry.
    let mut share = vec![0, 36, 0x00, 0x1d, 0, 32];
    share.extend_from_slice(&random::<32>());
    extension(&mut ext, 0x0033, &share);

    let mut hello = vec![0x03, 0x03];
    hello.extend_from_slice(&random::<32>());
    hello.push(32);
    hello.extend_from_slice(&random::<32>());
    // Cipher suites: the three TLS 1.3 suites, then two ECDHE-GCM ones for TLS 1.2.
    hello.extend_from_slice(&[0, 10, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03, 0xc0, 0x2b, 0xc0, 0x2f]);
    hello.extend_from_slice(&[1, 0]);
    hello.extend_from_slice(&u16_len(ext.len()));
    hello.extend_from_slice(&ext);

    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&u32::try_from(hello.len()).unwrap_or(0).to_be_bytes()[1..]);
    handshake.extend_from_slice(&hello);
    let mut record = vec![CONTENT_HANDSHAKE, 0x03, 0x01];
    record.extend_from_slice(&u16_len(handshake.len()));
    record.extend_from_slice(&handshake);
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_consistent() {
        let r = client_hello("example.test");
        assert_eq!(r[0], CONTENT_HANDSHAKE);
        let record_len = usize::from(u16::from_be_bytes([r[3], r[4]]));
        assert_eq!(record_len, r.len() - 5);
        let hs_len = usize::from(r[6]) << 16 | usize::from(r[7]) << 8 | usize::from(r[8]);
        assert_eq!(hs_len, r.len() - 9);
        assert!(r.windows(12).any(|w| w == b"example.test"));
    }
}
