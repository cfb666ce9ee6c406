//! Recognising answers and requests at the front of a byte stream, without a
//! [`crate::Connection`].
//!
//! A thread that reads its connection's socket itself (while the runtime lends it the receive
//! side) handles only what it can handle alone: whole `Response` and `Error` frames with small
//! payloads (and `Request` frames, for a server's or worker's reader), and the head of a
//! `Response` or `Request` with a large payload, which it then receives into a buffer of its
//! own. Anything else, a frame of another kind, a payload over the local limit, a small cut-off
//! payload, or bytes that are not a valid frame, is left untouched for the connection to parse,
//! from exactly that byte on.

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
    /// The head of a `Response` with a large payload, which is still to be received.
    Large(LargeHead<'a>),
    /// The start of a frame that may be an answer (or the head of a large one): more bytes are
    /// needed to tell.
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
    /// The header and meta of a frame of a wanted kind whose payload is large.
    Large {
        h: Header,
        meta: &'a [u8],
    },
    Partial,
    Other,
}

/// The frame of a kind `wanted` accepts at the front of `buf`, with a meta of at most
/// `MAX_META` bytes and a payload of at most `max_payload`: whole when its payload is small
/// (at most the reader's small-payload size, and no trailer), its head alone when the payload
/// is larger than that.
fn front(buf: &[u8], max_payload: u64, wanted: impl Fn(Kind) -> bool) -> Front<'_> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Front::Partial;
    };
    let Ok(h) = Header::decode(head) else {
        return Front::Other;
    };
    if !wanted(h.kind) || h.meta_len > MAX_META || h.payload_len > max_payload {
        return Front::Other;
    }
    let meta_end = HEADER_LEN + h.meta_len as usize;
    if h.payload_len > SMALL_PAYLOAD as u64 {
        if buf.len() < meta_end {
            return Front::Partial;
        }
        let meta = &buf[HEADER_LEN..meta_end];
        return Front::Large { h, meta };
    }
    if h.flags.trailer() {
        return Front::Other;
    }
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

/// The head of a frame whose payload is too large to be handled in place (over the reader's
/// small-payload size): whoever takes it receives the payload into a buffer of its own, then
/// the status byte if `trailer`. It borrows the buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct LargeHead<'a> {
    pub call_id: u64,
    /// Header and meta, in bytes: where the payload starts.
    pub head_len: usize,
    pub payload_len: u64,
    pub serde: u8,
    /// The call's flags (`NO_REPLY`, `TEXT`), without those of the wire.
    pub flags: crate::Flags,
    /// A status byte follows the payload (see the protocol's `TRAILER`).
    pub trailer: bool,
    /// A request's function; empty for a response.
    pub name: &'a str,
}

impl<'a> LargeHead<'a> {
    fn new(h: &Header, meta_len: usize, name: &'a str) -> LargeHead<'a> {
        LargeHead {
            call_id: h.call_id,
            head_len: HEADER_LEN + meta_len,
            payload_len: h.payload_len,
            serde: h.serde,
            flags: h.flags.without_wire(),
            trailer: h.flags.trailer(),
            name,
        }
    }
}

/// Looks at the frame at the front of `buf`. Answers with payloads over `max_payload` are
/// `Other`, and so are large `Error` frames.
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
        // Its meta is empty, but what the connection would refuse must not pass here.
        Front::Large { h, meta }
            if h.kind == Kind::Response && std::str::from_utf8(meta).is_ok() =>
        {
            return Scan::Large(LargeHead::new(&h, meta.len(), ""));
        }
        Front::Partial => return Scan::Partial,
        Front::Large { .. } | Front::Other => return Scan::Other,
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
    /// The head of a request with a large payload, which is still to be received.
    Large(LargeHead<'a>),
    /// The start of a frame that may be a request (or the head of a large one): more bytes are
    /// needed to tell.
    Partial,
    /// Something only the connection may handle (any other kind, a payload over `max_payload`,
    /// a small cut-off one, a wrongly routed request, bytes that are not a frame).
    Other,
}

/// Looks at the frame at the front of `buf` for a request with a payload of at most
/// `max_payload` bytes. On a `routed` connection (a client's, through a Router) a request's
/// meta is `caller\0function` and the name returned is the function's; on any other its meta
/// is the function's name alone.
pub fn scan_request(buf: &[u8], max_payload: u64, routed: bool) -> ScanRequest<'_> {
    let (h, meta, payload, len) = match front(buf, max_payload, |k| k == Kind::Request) {
        Front::Frame {
            h,
            meta,
            payload,
            len,
        } => (h, meta, payload, len),
        Front::Large { h, meta } => {
            return match function(meta, routed) {
                Some(name) => ScanRequest::Large(LargeHead::new(&h, meta.len(), name)),
                None => ScanRequest::Other,
            };
        }
        Front::Partial => return ScanRequest::Partial,
        Front::Other => return ScanRequest::Other,
    };
    match function(meta, routed) {
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

/// The function a request's meta names (see [`scan_request`]).
fn function(meta: &[u8], routed: bool) -> Option<&str> {
    match std::str::from_utf8(meta) {
        Ok(meta) if routed => meta.split_once('\0').map(|(_, name)| name),
        Ok(meta) if !meta.contains('\0') => Some(meta),
        _ => None,
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
        assert!(matches!(
            scan_request(&big, 1 << 30, false),
            ScanRequest::Large(LargeHead { name: "f", .. })
        ));
        assert_eq!(
            scan_request(&big, SMALL_PAYLOAD as u64, false),
            ScanRequest::Other
        );
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
    fn large_payloads_are_reported_by_their_head() {
        let len = SMALL_PAYLOAD + 1;
        let answer = frame(
            Kind::Response,
            9,
            Flags::TEXT | Flags::TRAILER,
            "",
            &vec![7u8; len],
        );
        let head = LargeHead {
            call_id: 9,
            head_len: HEADER_LEN,
            payload_len: len as u64,
            serde: 2,
            flags: Flags(Flags::TEXT),
            trailer: true,
            name: "",
        };
        // The head is enough: none of the payload needs to be there.
        assert_eq!(scan(&answer[..HEADER_LEN], 1 << 30), Scan::Large(head));
        assert_eq!(scan(&answer[..HEADER_LEN - 1], 1 << 30), Scan::Partial);
        assert_eq!(scan(&answer, len as u64 - 1), Scan::Other);

        let request = frame(
            Kind::Request,
            10,
            Flags::NO_REPLY,
            "caller\0echo",
            &vec![1u8; len],
        );
        let head_len = HEADER_LEN + "caller\0echo".len();
        let ScanRequest::Large(head) = scan_request(&request[..head_len], 1 << 30, true) else {
            panic!("no large request")
        };
        assert_eq!(
            head,
            LargeHead {
                call_id: 10,
                head_len,
                payload_len: len as u64,
                serde: 2,
                flags: Flags(Flags::NO_REPLY),
                trailer: false,
                name: "echo",
            }
        );
        // Until its meta is whole, nobody can tell whom it is for.
        assert_eq!(
            scan_request(&request[..head_len - 1], 1 << 30, true),
            ScanRequest::Partial
        );
        // A routed request without its caller's name is the connection's to report.
        let bare = frame(Kind::Request, 11, 0, "echo", &vec![1u8; len]);
        assert_eq!(scan_request(&bare, 1 << 30, true), ScanRequest::Other);
        // So is an answer whose meta is not UTF-8.
        let mut bad = frame(Kind::Response, 12, 0, "x", &vec![1u8; len]);
        bad[HEADER_LEN] = 0xff;
        assert_eq!(scan(&bad, 1 << 30), Scan::Other);
    }

    #[test]
    fn anything_else_is_left_to_the_connection() {
        let request = frame(Kind::Request, 1, 0, "f", b"x");
        assert_eq!(scan(&request, 1 << 30), Scan::Other);
        let goodbye = frame(Kind::Goodbye, 0, 0, "", b"bye");
        assert_eq!(scan(&goodbye, 1 << 30), Scan::Other);
        // Large errors, over the local limit, small and cut off (trailer), or not a frame.
        let big = frame(Kind::Error, 2, 0, "remote", &vec![0u8; SMALL_PAYLOAD + 1]);
        assert_eq!(scan(&big, 1 << 30), Scan::Other);
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
