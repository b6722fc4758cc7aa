//! The launcher ↔ init control channel: a SEQPACKET socketpair (one message per send, boundaries kept) that
//! carries "the spec is ready", the bottle's in-namespace proxy listener (SCM_RIGHTS) and the readiness verdict.
//! Trusts: the peer is our own re-executed binary, but a message that is not one of ours is an error.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags, SocketFlags, SocketType, recvmsg, sendmsg, socketpair,
};

/// Largest message: a failure reason is cut to fit.
const MAX_MESSAGE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The spec is written (from the launcher): the init, started ahead of it, may read it now.
    Spec,
    /// A host path of the spec's `trees()` (by index), as an idmapped detached mount (SCM_RIGHTS), from the
    /// launcher, before `Spec`.
    Tree(u32),
    /// The init's proxy listener is attached (from the child) / the proxy serves it (from the launcher).
    Listener,
    Go,
    Ready,
    Fail(String),
    /// From the agent's process: its command could not start (why). It may come before the init's `Ready`.
    NoStart(String),
    /// From the agent's process to its socket warden: the connect filter's listener (SCM_RIGHTS).
    Warden,
}

impl Message {
    fn encode(&self) -> Vec<u8> {
        match self {
            Self::Spec => b"spec".to_vec(),
            Self::Listener => b"listener".to_vec(),
            Self::Tree(i) => format!("tree:{i}").into_bytes(),
            Self::Go => b"go".to_vec(),
            Self::Ready => b"ready".to_vec(),
            Self::Warden => b"warden".to_vec(),
            Self::Fail(why) => {
                let mut v = b"fail:".to_vec();
                v.extend(why.bytes().take(MAX_MESSAGE - 5));
                v
            }
            Self::NoStart(why) => {
                let mut v = b"nostart:".to_vec();
                v.extend(why.bytes().take(MAX_MESSAGE - 8));
                v
            }
        }
    }

    fn decode(bytes: &[u8]) -> io::Result<Self> {
        Ok(match bytes {
            b"spec" => Self::Spec,
            b"listener" => Self::Listener,
            [b't', b'r', b'e', b'e', b':', rest @ ..] => Self::Tree(
                std::str::from_utf8(rest)
                    .ok()
                    .and_then(|i| i.parse().ok())
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a tree message without its index"))?,
            ),
            b"go" => Self::Go,
            b"ready" => Self::Ready,
            b"warden" => Self::Warden,
            [b'f', b'a', b'i', b'l', b':', rest @ ..] => Self::Fail(String::from_utf8_lossy(rest).into_owned()),
            [b'n', b'o', b's', b't', b'a', b'r', b't', b':', rest @ ..] => {
                Self::NoStart(String::from_utf8_lossy(rest).into_owned())
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected control message ({} bytes)", other.len()),
                ));
            }
        })
    }
}

/// Both ends, close-on-exec; the launcher clears the flag on the child's end only while spawning.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

pub fn send(sock: impl AsFd, msg: &Message, fd: Option<std::os::fd::BorrowedFd<'_>>) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        anc.push(SendAncillaryMessage::ScmRights(&fds));
    }
    let bytes = msg.encode();
    sendmsg(sock, &[IoSlice::new(&bytes)], &mut anc, SendFlags::NOSIGNAL)?;
    Ok(())
}

/// Receives one message (and the descriptor attached to it, if any). `Ok(None)`: the peer closed, or
/// (non-blocking) nothing is there yet.
pub fn recv(sock: impl AsFd, nonblocking: bool) -> io::Result<Option<(Message, Option<OwnedFd>)>> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let flags = if nonblocking {
        RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC
    } else {
        RecvFlags::CMSG_CLOEXEC
    };
    let n = match recvmsg(sock, &mut [IoSliceMut::new(&mut buf)], &mut anc, flags) {
        Ok(r) => r.bytes,
        Err(rustix::io::Errno::AGAIN) if nonblocking => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if n == 0 {
        return Ok(None);
    }
    let mut fd = None;
    for m in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for f in fds {
                fd.get_or_insert(f);
            }
        }
    }
    Ok(Some((Message::decode(&buf[..n])?, fd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_descriptors_cross_the_pair() {
        let (a, b) = pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        send(&a, &Message::Listener, Some(listener.as_fd())).unwrap();
        send(&a, &Message::Fail("no proxy".into()), None).unwrap();
        let (m, fd) = recv(&b, false).unwrap().unwrap();
        assert_eq!(m, Message::Listener);
        let got = std::net::TcpListener::from(fd.unwrap());
        assert_eq!(got.local_addr().unwrap(), listener.local_addr().unwrap());
        assert_eq!(recv(&b, false).unwrap().unwrap().0, Message::Fail("no proxy".into()));
        assert!(recv(&b, true).unwrap().is_none());
        drop(a);
        assert!(recv(&b, false).unwrap().is_none());
    }

    #[test]
    fn every_message_round_trips() {
        for m in [
            Message::Spec,
            Message::Tree(0),
            Message::Tree(17),
            Message::Listener,
            Message::Go,
            Message::Ready,
            Message::Fail("why".into()),
            Message::NoStart("`x`: not found".into()),
            Message::Warden,
        ] {
            assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn unknown_messages_are_errors() {
        assert!(Message::decode(b"ready!").is_err());
        assert!(Message::decode(b"tree:").is_err());
        assert!(Message::decode(b"tree:-1").is_err());
    }
}
