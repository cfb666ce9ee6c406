//! Recognising small answers at the front of a byte stream, without a [`crate::Connection`].
//!
//! A client thread that reads its connection's socket itself (while the runtime lends it the
//! receive side) handles only what it can handle alone: whole `Response` and `Error` frames with
//! small payloads. Anything else, a frame of another kind, a large or cut-off payload, or bytes
//! that are not a valid frame, is left untouched for the connection to parse, from exactly that
//! byte on.

use crate::frame::{HEADER_LEN, Header, Kind};
use crate::reader::{MAX_META, SMALL_PAYLOAD};

/// An answer found at the front of a buffer; it borrows the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer<'a> {
    /// A `Response`: the call's result.
    Result {
        serde: u8,
        flags: crate::Flags,
        payload: &'a [u8],
    },
    /// An `Error` frame: its code and payload.
    Error { code: &'a str, payload: &'a [u8] },
}

/// What the front of a buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan<'a> {
    /// A whole small answer to call `call_id`, `len` bytes long.
    Answer {
        call_id: u64,
        len: usize,
        answer: Answer<'a>,
    },
    /// The start of a frame that may be a small answer: more bytes are needed to tell.
    Partial,
    /// Something only the connection may handle.
    Other,
}

/// The front of a buffer as both scanners see it.
enum Front<'a> {
    /// A whole small frame of a wanted kind: its header, meta, payload and length in bytes.
    Frame {
        h: Header,
        meta: &'a [u8],
        payload: &'a [u8],
        len: usize,
    },
    Partial,
    Other,
}

/// The small frame of a kind `wanted` accepts at the front of `buf`: one with a meta of at
/// most `MAX_META` bytes, a payload of at most `max_payload` (itself capped at the reader's
/// small-payload size) and no trailer.
fn front(buf: &[u8], max_payload: u64, wanted: impl Fn(Kind) -> bool) -> Front<'_> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Front::Partial;
    };
    let Ok(h) = Header::decode(head) else {
        return Front::Other;
    };
    let max_payload = max_payload.min(SMALL_PAYLOAD as u64);
    let small = h.meta_len <= MAX_META && h.payload_len <= max_payload;
    if !wanted(h.kind) || h.flags.trailer() || !small {
        return Front::Other;
    }
    let meta_end = HEADER_LEN + h.meta_len as usize;
    let len = meta_end + h.payload_len as usize;
    if buf.len() < len {
        return Front::Partial;
    }
    Front::Frame {
        h,
        meta: &buf[HEADER_LEN..meta_end],
        payload: &buf[meta_end..len],
        len,
    }
}

/// Looks at the frame at the front of `buf`. Answers with payloads over `max_payload` (itself
/// capped at the reader's small-payload size) are `Other`.
pub fn scan(buf: &[u8], max_payload: u64) -> Scan<'_> {
    let (h, meta, payload, len) = match front(buf, max_payload, |k| {
        matches!(k, Kind::Response | Kind::Error)
    }) {
        Front::Frame {
            h,
            meta,
            payload,
            len,
        } => (h, meta, payload, len),
        Front::Partial => return Scan::Partial,
        Front::Other => return Scan::Other,
    };
    let Ok(meta) = std::str::from_utf8(meta) else {
        return Scan::Other;
    };
    let answer = match h.kind {
        Kind::Response => Answer::Result {
            serde: h.serde,
            flags: h.flags.without_wire(),
            payload,
        },
        _ => Answer::Error {
            code: meta,
            payload,
        },
    };
    Scan::Answer {
        call_id: h.call_id,
        len,
        answer,
    }
}

/// A request found at the front of a buffer; it borrows the buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub call_id: u64,
    /// The frame's length in bytes.
    pub len: usize,
    pub name: &'a str,
    pub serde: u8,
    pub flags: crate::Flags,
    pub payload: &'a [u8],
}

/// What the front of a buffer holds, for a server's reader.
#[derive(Debug, PartialEq, Eq)]
pub enum ScanRequest<'a> {
    Request(Request<'a>),
    /// The start of a frame that may be a small request: more bytes are needed to tell.
    Partial,
    /// Something only the connection may handle (any other kind, a large or cut-off payload, a
    /// routed request, bytes that are not a frame).
    Other,
}

/// Looks at the frame at the front of `buf` for a request with a payload of at most
/// `max_payload` bytes (itself capped at the reader's small-payload size). On a `routed`
/// connection (a client's, through a Router) a request's meta is `caller\0function` and the
/// name returned is the function's; on any other its meta is the function's name alone.
pub fn scan_request(buf: &[u8], max_payload: u64, routed: bool) -> ScanRequest<'_> {
    let (h, meta, payload, len) = match front(buf, max_payload, |k| k == Kind::Request) {
        Front::Frame {
            h,
            meta,
            payload,
            len,
        } => (h, meta, payload, len),
        Front::Partial => return ScanRequest::Partial,
        Front::Other => return ScanRequest::Other,
    };
    let name = match std::str::from_utf8(meta) {
        Ok(meta) if routed => meta.split_once('\0').map(|(_, name)| name),
        Ok(meta) if !meta.contains('\0') => Some(meta),
        _ => None,
    };
    match name {
        Some(name) => ScanRequest::Request(Request {
            call_id: h.call_id,
            len,
            name,
            serde: h.serde,
            flags: h.flags.without_wire(),
            payload,
        }),
        None => ScanRequest::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Flags;
    use crate::frame::encode_head;

    fn frame(kind: Kind, id: u64, flags: u8, meta: &str, payload: &[u8]) -> Vec<u8> {
        let mut v = encode_head(kind, id, 2, flags, meta, payload.len() as u64).to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn finds_small_answers_and_leaves_the_rest() {
        let mut stream = frame(Kind::Response, 7, Flags::TEXT, "", b"hello");
        let first = stream.len();
        stream.extend(frame(Kind::Error, 8, 0, "remote", b"boom"));
        let Scan::Answer {
            call_id,
            len,
            answer,
        } = scan(&stream, 1 << 30)
        else {
            panic!("no answer")
        };
        assert_eq!((call_id, len), (7, first));
        assert_eq!(
            answer,
            Answer::Result {
                serde: 2,
                flags: Flags(Flags::TEXT),
                payload: b"hello"
            }
        );
        assert_eq!(
            scan(&stream[first..], 1 << 30),
            Scan::Answer {
                call_id: 8,
                len: stream.len() - first,
                answer: Answer::Error {
                    code: "remote",
                    payload: b"boom"
                }
            }
        );
        // Every cut of a small answer is partial, never misread.
        for cut in 0..first {
            assert_eq!(scan(&stream[..cut], 1 << 30), Scan::Partial, "cut at {cut}");
        }
    }

    #[test]
    fn finds_small_direct_requests() {
        let mut stream = frame(Kind::Request, 3, Flags::NO_REPLY, "echo", b"abc");
        let first = stream.len();
        stream.extend(frame(Kind::Response, 4, 0, "", b"x"));
        assert_eq!(
            scan_request(&stream, 1 << 30, false),
            ScanRequest::Request(Request {
                call_id: 3,
                len: first,
                name: "echo",
                serde: 2,
                flags: Flags(Flags::NO_REPLY),
                payload: b"abc"
            })
        );
        for cut in 0..first {
            assert_eq!(
                scan_request(&stream[..cut], 1 << 30, false),
                ScanRequest::Partial
            );
        }
        assert_eq!(
            scan_request(&stream[first..], 1 << 30, false),
            ScanRequest::Other
        );
        // A routed request on a direct connection is the connection's to refuse.
        let routed = frame(Kind::Request, 5, 0, "peer\0echo", b"");
        assert_eq!(scan_request(&routed, 1 << 30, false), ScanRequest::Other);
        let big = frame(Kind::Request, 6, 0, "f", &vec![1u8; SMALL_PAYLOAD + 1]);
        assert_eq!(scan_request(&big, 1 << 30, false), ScanRequest::Other);
        assert_eq!(
            scan_request(&frame(Kind::Request, 7, 0, "f", b"12"), 1, false),
            ScanRequest::Other
        );
    }

    #[test]
    fn routed_requests_name_the_function_after_the_caller() {
        let routed = frame(Kind::Request, 5, 0, "caller\0echo", b"hi");
        assert_eq!(
            scan_request(&routed, 1 << 30, true),
            ScanRequest::Request(Request {
                call_id: 5,
                len: routed.len(),
                name: "echo",
                serde: 2,
                flags: Flags(0),
                payload: b"hi"
            })
        );
        // Without a caller's name the connection reports the broken frame.
        let bare = frame(Kind::Request, 6, 0, "echo", b"");
        assert_eq!(scan_request(&bare, 1 << 30, true), ScanRequest::Other);
        for cut in 0..routed.len() {
            assert_eq!(
                scan_request(&routed[..cut], 1 << 30, true),
                ScanRequest::Partial
            );
        }
    }

    #[test]
    fn anything_else_is_left_to_the_connection() {
        let request = frame(Kind::Request, 1, 0, "f", b"x");
        assert_eq!(scan(&request, 1 << 30), Scan::Other);
        let goodbye = frame(Kind::Goodbye, 0, 0, "", b"bye");
        assert_eq!(scan(&goodbye, 1 << 30), Scan::Other);
        // Large, over the local limit, cut off (trailer), or not a frame at all.
        let big = frame(Kind::Response, 2, 0, "", &vec![0u8; SMALL_PAYLOAD + 1]);
        assert_eq!(scan(&big[..HEADER_LEN], 1 << 30), Scan::Other);
        assert_eq!(
            scan(&frame(Kind::Response, 3, 0, "", b"abcd"), 3),
            Scan::Other
        );
        let cut = frame(Kind::Response, 4, Flags::TRAILER, "", b"abc\x01");
        assert_eq!(scan(&cut, 1 << 30), Scan::Other);
        assert_eq!(scan(&[0u8; HEADER_LEN], 1 << 30), Scan::Other);
        let bad_meta = frame(Kind::Error, 5, 0, "\u{e9}", b"");
        let mut bad_meta = bad_meta;
        bad_meta[HEADER_LEN] = 0xff;
        assert_eq!(scan(&bad_meta, 1 << 30), Scan::Other);
    }
}
