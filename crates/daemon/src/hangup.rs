//! How a connection's builds notice that its client has gone: the connection's input,
//! polled while the builds run. A client that hangs up cancels what only it wanted.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::poll::PollFlags;

/// The client's end to watch.
#[derive(Debug)]
pub enum Hangup {
    /// A socket (an accepted connection, or `--stdio` on a socket as `ssh` may give):
    /// end-of-file tells, without taking the data a client sent early.
    Socket(UnixStream),
    /// A pipe (`--stdio` under `ssh` or a parent process): the writer closed with no data
    /// left is a hang-up.
    Pipe(OwnedFd),
}

/// What a poll of the input found.
#[derive(Debug, PartialEq, Eq)]
pub enum HangupState {
    /// The client is gone.
    Gone,
    /// The client sent something early (the next request reads it); stop watching, as
    /// reading on would take the request away.
    SentData,
    /// Nothing certain (a spurious wake-up).
    Unknown,
}

impl Hangup {
    /// `fd` as a socket when it is one, else as a pipe.
    pub fn of(fd: OwnedFd) -> Hangup {
        use nix::sys::stat::SFlag;
        let is_socket =
            nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd)).is_ok_and(|st| {
                SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK
            });
        if is_socket {
            Hangup::Socket(UnixStream::from(fd))
        } else {
            Hangup::Pipe(fd)
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Hangup::Socket(s) => s.as_fd(),
            Hangup::Pipe(p) => p.as_fd(),
        }
    }

    /// Reads the state from the events a poll for `POLLIN` returned.
    pub fn state(&self, revents: PollFlags) -> HangupState {
        match self {
            Hangup::Socket(s) => {
                use nix::sys::socket::{recv, MsgFlags};
                use std::os::fd::AsRawFd;
                let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
                match recv(s.as_raw_fd(), &mut [0u8; 1], flags) {
                    Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {
                        HangupState::Unknown
                    }
                    Ok(n) if n > 0 => HangupState::SentData,
                    _ => HangupState::Gone,
                }
            }
            // A pipe cannot be peeked at: readable data means the client is there; a
            // hang-up (or an error) without data means it is gone.
            Hangup::Pipe(_) => {
                if revents.contains(PollFlags::POLLIN) {
                    HangupState::SentData
                } else if revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                    HangupState::Gone
                } else {
                    HangupState::Unknown
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{poll, PollFd, PollTimeout};
    use std::io::Write;

    fn polled(h: &Hangup) -> PollFlags {
        let mut fds = [PollFd::new(h.fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(1000u16)).unwrap();
        fds[0].revents().unwrap()
    }

    #[test]
    fn a_pipe_whose_writer_closed_is_gone_and_data_is_not() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let h = Hangup::of(r);
        assert!(matches!(h, Hangup::Pipe(_)));
        let mut w = std::fs::File::from(w);
        w.write_all(b"x").unwrap();
        assert_eq!(h.state(polled(&h)), HangupState::SentData);
        drop(w);
        let (r2, w2) = nix::unistd::pipe().unwrap();
        let h2 = Hangup::of(r2);
        drop(w2);
        assert_eq!(h2.state(polled(&h2)), HangupState::Gone);
    }

    #[test]
    fn a_socket_peer_that_left_is_gone_and_data_is_not() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let h = Hangup::of(OwnedFd::from(a));
        assert!(matches!(h, Hangup::Socket(_)));
        b.write_all(b"x").unwrap();
        assert_eq!(h.state(polled(&h)), HangupState::SentData);
        let (c, d) = UnixStream::pair().unwrap();
        let h2 = Hangup::of(OwnedFd::from(c));
        drop(d);
        assert_eq!(h2.state(polled(&h2)), HangupState::Gone);
    }
}
