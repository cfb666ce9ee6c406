//! The fixed 32-byte frame header and the frame kinds.

use bytes::{BufMut, Bytes, BytesMut};

/// Every frame starts with these two bytes.
pub const MAGIC: [u8; 2] = *b"DF";
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 32;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum Kind {
    /// Client → server, first frame: meta = client name, payload = [`crate::Hello`].
    Hello = 1,
    /// Server → client, answer to `Hello`: meta = server name, payload = [`crate::Hello`].
    Welcome = 2,
    /// A call: meta = function name, payload = encoded arguments.
    Request = 3,
    /// The result of a call: payload = encoded result.
    Response = 4,
    /// A call failed: meta = error code (see [`error_code`]), payload = details.
    Error = 5,
    /// New functions exported on a live connection: payload = name list.
    Announce = 6,
    /// The sender is closing the connection: meta = reason.
    Goodbye = 7,
    /// Router → client: peers that are (or became) reachable through the router: payload =
    /// peer list (see [`crate::handshake::encode_peers`]).
    Joined = 8,
    /// Router → client: a peer left: meta = its name.
    Left = 9,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Request,
            4 => Kind::Response,
            5 => Kind::Error,
            6 => Kind::Announce,
            7 => Kind::Goodbye,
            8 => Kind::Joined,
            9 => Kind::Left,
            _ => return None,
        })
    }
}

/// Frame flags (one byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Flags(pub u8);

impl Flags {
    /// The caller does not want a response (`*_nowait`).
    pub const NO_REPLY: u8 = 0x01;
    /// The payload is UTF-8 text (an OPAQUE `str`).
    pub const TEXT: u8 = 0x02;
    /// On a `Welcome`: the server is a Router (requests name their target peer, membership
    /// arrives in `Joined` and `Left` frames).
    pub const ROUTER: u8 = 0x04;
    /// On a `Request`, `Response` or `Error`: one status byte follows the payload, 0 when the
    /// payload is complete, anything else when its sender lost it midway (a Router forwarding
    /// a payload while it still arrives sets it; see `docs/protocol.md`).
    pub const TRAILER: u8 = 0x08;
    const KNOWN: u8 = Self::NO_REPLY | Self::TEXT | Self::ROUTER | Self::TRAILER;

    pub fn no_reply(self) -> bool {
        self.0 & Self::NO_REPLY != 0
    }
    pub fn text(self) -> bool {
        self.0 & Self::TEXT != 0
    }
    pub fn router(self) -> bool {
        self.0 & Self::ROUTER != 0
    }
    pub fn trailer(self) -> bool {
        self.0 & Self::TRAILER != 0
    }
    /// The flags that describe the call or its payload (`NO_REPLY`, `TEXT`), without those
    /// that only describe how the frame travelled.
    pub fn without_wire(self) -> Flags {
        Flags(self.0 & (Self::NO_REPLY | Self::TEXT))
    }
}

/// Error codes carried in the meta of an [`Kind::Error`] frame.
pub mod error_code {
    /// The callee's function raised; payload = UTF-8 JSON `{type, message, traceback}`.
    pub const REMOTE: &str = "remote";
    /// No such function on the receiver; payload = UTF-8 message.
    pub const NO_FUNCTION: &str = "no-function";
    /// The request was larger than the receiver accepts; payload = UTF-8 message.
    pub const TOO_LARGE: &str = "too-large";
    /// The request could not be delivered (a Router knows no such peer, or the peer does not
    /// export the function); payload = UTF-8 message.
    pub const UNDELIVERABLE: &str = "undeliverable";
    /// The peer the request was delivered to left before answering; payload = UTF-8 message.
    pub const DISCONNECTED: &str = "disconnected";
    /// The receiver does not accept the request (for example its serde format); payload =
    /// UTF-8 message.
    pub const REFUSED: &str = "refused";
}

/// The fixed header of a frame, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub serde: u8,
    pub flags: Flags,
    pub call_id: u64,
    pub meta_len: u32,
    pub payload_len: u64,
}

/// Why a header could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    #[error("bad magic {0:02x?}: not a daffi peer")]
    Magic([u8; 2]),
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("unknown flags {0:#04x}")]
    Flags(u8),
    #[error("reserved bytes are not zero")]
    Reserved,
}

impl Header {
    pub fn new(kind: Kind, call_id: u64) -> Header {
        Header {
            kind,
            serde: 0,
            flags: Flags::default(),
            call_id,
            meta_len: 0,
            payload_len: 0,
        }
    }

    /// Total bytes following the header.
    pub fn body_len(&self) -> u64 {
        (self.meta_len as u64).saturating_add(self.payload_len)
    }

    pub fn encode(&self, out: &mut [u8; HEADER_LEN]) {
        out[0..2].copy_from_slice(&MAGIC);
        out[2] = VERSION;
        out[3] = self.kind as u8;
        out[4] = self.serde;
        out[5] = self.flags.0;
        out[6..8].copy_from_slice(&[0, 0]);
        out[8..16].copy_from_slice(&self.call_id.to_le_bytes());
        out[16..20].copy_from_slice(&self.meta_len.to_le_bytes());
        out[20..24].copy_from_slice(&[0; 4]);
        out[24..32].copy_from_slice(&self.payload_len.to_le_bytes());
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, HeaderError> {
        if b[0..2] != MAGIC {
            return Err(HeaderError::Magic([b[0], b[1]]));
        }
        if b[2] != VERSION {
            return Err(HeaderError::Version(b[2]));
        }
        let kind = Kind::from_u8(b[3]).ok_or(HeaderError::Kind(b[3]))?;
        if b[5] & !Flags::KNOWN != 0 {
            return Err(HeaderError::Flags(b[5]));
        }
        if b[6..8] != [0, 0] || b[20..24] != [0; 4] {
            return Err(HeaderError::Reserved);
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Ok(Header {
            kind,
            serde: b[4],
            flags: Flags(b[5]),
            call_id: u64_at(8),
            meta_len: u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")),
            payload_len: u64_at(24),
        })
    }
}

/// Where a received frame's payload is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Parsed out of the staging buffer.
    Inline(Vec<u8>),
    /// Received by the runtime into a buffer of its own; this many bytes.
    External(u64),
}

impl Payload {
    /// The inline bytes (empty for an external payload).
    pub fn inline(&self) -> &[u8] {
        match self {
            Payload::Inline(v) => v,
            Payload::External(_) => &[],
        }
    }
}

/// A whole received frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    /// Kind-specific metadata: a function name, a peer name, an error code.
    pub meta: String,
    pub payload: Payload,
}

/// Encodes a header and its meta into one buffer; the payload travels separately so that a large
/// payload is never copied to be framed.
pub fn encode_head(
    kind: Kind,
    call_id: u64,
    serde: u8,
    flags: u8,
    meta: &str,
    payload_len: u64,
) -> Bytes {
    let header = Header {
        kind,
        serde,
        flags: Flags(flags),
        call_id,
        meta_len: meta.len() as u32,
        payload_len,
    };
    let mut raw = [0u8; HEADER_LEN];
    header.encode(&mut raw);
    let mut out = BytesMut::with_capacity(HEADER_LEN + meta.len());
    out.put_slice(&raw);
    out.put_slice(meta.as_bytes());
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header {
            kind: Kind::Request,
            serde: 2,
            flags: Flags(Flags::NO_REPLY | Flags::TEXT),
            call_id: u64::MAX - 7,
            meta_len: 5,
            payload_len: 3 << 32,
        };
        let mut raw = [0u8; HEADER_LEN];
        h.encode(&mut raw);
        assert_eq!(Header::decode(&raw), Ok(h));
    }

    #[test]
    fn header_rejects_garbage() {
        let mut raw = [0u8; HEADER_LEN];
        Header::new(Kind::Response, 1).encode(&mut raw);
        let mut bad = raw;
        bad[0] = b'G';
        assert!(matches!(Header::decode(&bad), Err(HeaderError::Magic(_))));
        let mut bad = raw;
        bad[2] = 9;
        assert_eq!(Header::decode(&bad), Err(HeaderError::Version(9)));
        let mut bad = raw;
        bad[3] = 200;
        assert_eq!(Header::decode(&bad), Err(HeaderError::Kind(200)));
        let mut bad = raw;
        bad[5] = 0x80;
        assert_eq!(Header::decode(&bad), Err(HeaderError::Flags(0x80)));
        let mut bad = raw;
        bad[21] = 1;
        assert_eq!(Header::decode(&bad), Err(HeaderError::Reserved));
    }
}
