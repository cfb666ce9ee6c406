//! daffi's wire protocol, without any I/O.
//!
//! This crate turns bytes into frames and frames into bytes, runs the handshake and keeps the
//! state of one connection. It owns no sockets, reads no clocks and starts no threads: the
//! runtime feeds it received bytes and drains the bytes it wants sent.
//!
//! ```text
//!   socket bytes ──► FrameReader ──► Connection::handle_frame ──► Event (Request, Response, ...)
//!   Connection::request/respond/... ──► outgoing Bytes (header + meta, payload) ──► socket
//! ```
//!
//! The byte layout is described in `docs/protocol.md` at the repository root; golden frames live
//! in `testdata/`.
#![forbid(unsafe_code)]

pub mod answer;
pub mod connection;
pub mod frame;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod reader;
pub mod router;

pub use connection::{Connection, Event, Local, Peer, Role};
pub use frame::{Flags, Frame, HEADER_LEN, Header, Kind, MAGIC, Payload, VERSION};
pub use handshake::Hello;
pub use reader::{DecodeError, FrameReader, RecvTarget};
pub use router::{Action, Forward, RoutingTable};

/// Default cap on the payload of one incoming call (meta not counted): 1 GiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 1 << 30;
