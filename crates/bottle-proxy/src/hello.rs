//! Reads the first TLS handshake message from a tunnel and extracts the ClientHello's server name (RFC 8446 §4.1.2,
//! RFC 6066 §3). Everything here is attacker-controlled bytes: bounded reads, checked lengths, no panics.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// TLS record header: type, version (2), length (2).
const RECORD_HEADER_LEN: usize = 5;
const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
/// Largest ClientHello accepted (post-quantum key shares make hellos of a few KiB; 64 KiB is generous).
const MAX_HELLO_LEN: usize = 64 * 1024;
/// RFC 8446 §5.1: a record carries at most 2^14 bytes of plaintext.
const MAX_RECORD_LEN: usize = 16 * 1024;
const EXT_SERVER_NAME: u16 = 0x0000;
/// draft-ietf-tls-esni: Encrypted Client Hello hides the real server name.
const EXT_ECH: u16 = 0xfe0d;

#[derive(Debug)]
pub struct Hello {
    /// Every byte read, to replay to the TLS acceptor or the passthrough upstream.
    pub raw: Bytes,
    pub sni: Option<String>,
    pub ech: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("the stream does not start with a TLS handshake record")]
    NotTls,
    #[error("the ClientHello is malformed: {0}")]
    Malformed(&'static str),
    #[error("the connection closed inside the ClientHello")]
    Truncated,
    #[error("reading the ClientHello failed")]
    Io(#[from] std::io::Error),
}

/// Reads records until one whole ClientHello message is buffered.
pub async fn read<S: AsyncRead + Unpin>(io: &mut S) -> Result<Hello, HelloError> {
    let mut raw = BytesMut::with_capacity(2048);
    let mut message = Vec::new();
    let mut offset = 0;
    loop {
        fill(io, &mut raw, offset + RECORD_HEADER_LEN).await?;
        let header = &raw[offset..offset + RECORD_HEADER_LEN];
        if header[0] != CONTENT_HANDSHAKE || header[1] != 0x03 {
            return Err(if offset == 0 {
                HelloError::NotTls
            } else {
                HelloError::Malformed("record type")
            });
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD_LEN {
            return Err(HelloError::Malformed("record length"));
        }
        let start = offset + RECORD_HEADER_LEN;
        fill(io, &mut raw, start + len).await?;
        message.extend_from_slice(&raw[start..start + len]);
        offset = start + len;
        if message.len() >= 4 {
            if message[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::Malformed("first handshake message is not a ClientHello"));
            }
            let body_len = usize::from(message[1]) << 16 | usize::from(message[2]) << 8 | usize::from(message[3]);
            if body_len > MAX_HELLO_LEN {
                return Err(HelloError::Malformed("ClientHello too large"));
            }
            if message.len() >= 4 + body_len {
                let (sni, ech) = parse_client_hello(&message[4..4 + body_len])?;
                return Ok(Hello {
                    raw: raw.freeze(),
                    sni,
                    ech,
                });
            }
        }
        if offset > MAX_HELLO_LEN {
            return Err(HelloError::Malformed("ClientHello too large"));
        }
    }
}

async fn fill<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut, want: usize) -> Result<(), HelloError> {
    while buf.len() < want {
        buf.reserve(want - buf.len());
        if io.read_buf(buf).await? == 0 {
            return Err(if buf.is_empty() {
                HelloError::NotTls
            } else {
                HelloError::Truncated
            });
        }
    }
    Ok(())
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed("truncated field"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<usize, HelloError> {
        Ok(usize::from(self.take(1)?[0]))
    }
    fn u16(&mut self) -> Result<usize, HelloError> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
}

/// Returns the server name (if any) and whether Encrypted Client Hello is offered.
fn parse_client_hello(body: &[u8]) -> Result<(Option<String>, bool), HelloError> {
    let mut c = Cursor(body);
    c.take(2 + 32)?; // legacy_version, random
    let n = c.u8()?;
    c.take(n)?; // legacy_session_id
    let n = c.u16()?;
    c.take(n)?; // cipher_suites
    let n = c.u8()?;
    c.take(n)?; // legacy_compression_methods
    if c.0.is_empty() {
        return Ok((None, false));
    }
    let n = c.u16()?;
    let mut exts = Cursor(c.take(n)?);
    let (mut sni, mut ech) = (None, false);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let n = exts.u16()?;
        let data = exts.take(n)?;
        if ty == usize::from(EXT_SERVER_NAME) {
            if sni.is_some() {
                return Err(HelloError::Malformed("two server_name extensions"));
            }
            sni = Some(server_name(data)?);
        } else if ty == usize::from(EXT_ECH) {
            ech = true;
        }
    }
    Ok((sni, ech))
}

fn server_name(data: &[u8]) -> Result<String, HelloError> {
    let mut c = Cursor(data);
    let n = c.u16()?;
    let mut list = Cursor(c.take(n)?);
    let mut found = None;
    while !list.0.is_empty() {
        let ty = list.u8()?;
        let n = list.u16()?;
        let name = list.take(n)?;
        if ty == 0 {
            // SECURITY: RFC 6066 allows one host_name; two would let the proxy and the upstream disagree.
            if found.is_some() {
                return Err(HelloError::Malformed("two host names in server_name"));
            }
            let name = std::str::from_utf8(name).map_err(|_| HelloError::Malformed("server name is not text"))?;
            found = Some(name.to_string());
        }
    }
    found.ok_or(HelloError::Malformed("server_name without a host name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello with the given extensions, split into records of `record` bytes.
    pub fn client_hello(sni: Option<&str>, record: usize) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let n = name.len() as u16;
            exts.extend_from_slice(&[0, 0]);
            exts.extend_from_slice(&(n + 5).to_be_bytes());
            exts.extend_from_slice(&(n + 3).to_be_bytes());
            exts.push(0);
            exts.extend_from_slice(&n.to_be_bytes());
            exts.extend_from_slice(name.as_bytes());
        }
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut msg = vec![1];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        let mut out = Vec::new();
        for chunk in msg.chunks(record) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[tokio::test]
    async fn sni_is_found_even_across_records() {
        for record in [16, 4096] {
            let bytes = client_hello(Some("api.example.com"), record);
            let hello = read(&mut bytes.as_slice()).await.unwrap();
            assert_eq!(hello.sni.as_deref(), Some("api.example.com"));
            assert_eq!(hello.raw.len(), bytes.len());
        }
        let bytes = client_hello(None, 4096);
        assert_eq!(read(&mut bytes.as_slice()).await.unwrap().sni, None);
    }

    #[tokio::test]
    async fn plain_http_and_garbage_are_not_tls() {
        assert!(matches!(
            read(&mut &b"GET / HTTP/1.1\r\n\r\n"[..]).await,
            Err(HelloError::NotTls)
        ));
        assert!(matches!(read(&mut &b""[..]).await, Err(HelloError::NotTls)));
        let mut bytes = client_hello(Some("a.example.com"), 4096);
        bytes.truncate(bytes.len() - 3);
        assert!(read(&mut bytes.as_slice()).await.is_err());
        let mut bytes = client_hello(Some("a.example.com"), 4096);
        bytes[3] = 0xff; // record length beyond the limit
        assert!(read(&mut bytes.as_slice()).await.is_err());
    }
}
