//! Splits a received byte stream into frames.
//!
//! Frames are parsed out of one reusable staging buffer, except the payloads of large requests
//! and responses: when such a header arrives the reader stops and reports
//! [`Item::BodyStart`], and the runtime receives the payload straight into a buffer of its own
//! (one that can become the caller's object without a copy), telling the reader how far it got
//! with [`FrameReader::body_received`]. A multi-GiB payload is never copied between buffers on
//! the way in.

use crate::frame::{Frame, HEADER_LEN, Header, HeaderError, Kind, MAGIC, Payload};

/// Request, response and error payloads up to this size are parsed out of the staging buffer.
pub const SMALL_PAYLOAD: usize = 16 * 1024;
/// Longest meta a frame may carry.
pub const MAX_META: u32 = 16 * 1024;
/// Usual capacity of the staging buffer; holds the largest small frame with room to spare.
pub const STAGING: usize = 64 * 1024;
/// Largest payload of a control frame (hello, error, announce...), which is always staged.
pub const MAX_CONTROL_PAYLOAD: u64 = 16 << 20;
/// Largest payload of a control frame before the handshake completes (see
/// [`FrameReader::handshake_done`]): a hello names its sender's functions, and a stranger
/// must not make a node stage and decode more than this before it proved who it is.
pub const MAX_HELLO_PAYLOAD: u64 = 1 << 20;

/// Why the received bytes are not a valid frame stream. Each of these closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("frame meta of {0} bytes exceeds the {MAX_META}-byte limit")]
    MetaTooLong(u32),
    #[error("{0:?} frame payload of {1} bytes exceeds the control-frame limit")]
    ControlTooLong(Kind, u64),
    #[error("{0} is not valid UTF-8")]
    Utf8(&'static str),
    #[error("bad handshake: {0}")]
    Handshake(&'static str),
    #[error("unexpected {0:?} frame {1}")]
    Unexpected(Kind, &'static str),
}

/// One item read off the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    Frame(Frame),
    /// A frame larger than the reader's limit. Its bytes are being skipped, never stored.
    Oversized(Header),
    /// A whole frame whose trailer (see [`crate::Flags::TRAILER`]) says its payload was lost
    /// midway: the payload is not to be used, only released.
    Aborted(Frame),
    /// The payload of a large request or response, of this many bytes, follows: the runtime
    /// receives it (see [`FrameReader::take_body_prefix`]), then the frame is reported with a
    /// [`Payload::External`] payload.
    BodyStart(u64),
}

/// Where the next receive should write: the spare capacity of `buf`, at most `max` bytes.
#[derive(Debug)]
pub struct RecvTarget {
    pub buf: Vec<u8>,
    pub max: usize,
}

#[derive(Debug)]
struct Body {
    header: Header,
    meta: String,
    remaining: u64,
}

/// The item for a complete frame: `Aborted` when its trailer byte says so.
fn finished(frame: Frame, status: u8) -> Item {
    if status == 0 {
        Item::Frame(frame)
    } else {
        Item::Aborted(frame)
    }
}

/// Incremental frame parser over an owned staging buffer (lent to the kernel and returned).
#[derive(Debug)]
pub struct FrameReader {
    max_message_size: u64,
    /// The bound on a control frame's payload now (see [`MAX_HELLO_PAYLOAD`]).
    control_limit: u64,
    staging: Vec<u8>,
    pos: usize,
    body: Option<Body>,
    skip: u64,
    lent: bool,
}

impl FrameReader {
    pub fn new(max_message_size: u64) -> FrameReader {
        FrameReader {
            max_message_size,
            control_limit: MAX_HELLO_PAYLOAD,
            staging: Vec::with_capacity(STAGING),
            pos: 0,
            body: None,
            skip: 0,
            lent: false,
        }
    }

    /// The handshake completed: control frames may now be as large as
    /// [`MAX_CONTROL_PAYLOAD`] (a Router's list of peers, a large announce).
    pub fn handshake_done(&mut self) {
        self.control_limit = MAX_CONTROL_PAYLOAD;
    }

    /// Lends out the staging buffer for the next receive.
    ///
    /// # Panics
    /// If it is already lent (a runtime bug, not something a peer can cause).
    pub fn target(&mut self) -> RecvTarget {
        assert!(!self.lent, "staging buffer lent twice");
        if self.pos > 0 {
            self.staging.copy_within(self.pos.., 0);
            self.staging.truncate(self.staging.len() - self.pos);
            self.pos = 0;
        }
        if self.staging.is_empty() && self.staging.capacity() > 4 * STAGING {
            // A big control frame grew the buffer; give the memory back.
            self.staging = Vec::with_capacity(STAGING);
        }
        self.lent = true;
        let max = self.staging.capacity() - self.staging.len();
        RecvTarget {
            buf: std::mem::take(&mut self.staging),
            max,
        }
    }

    /// Takes back the staging buffer with the received bytes appended.
    pub fn filled(&mut self, buf: Vec<u8>) {
        assert!(self.lent, "staging buffer returned but not lent");
        self.lent = false;
        self.staging = buf;
    }

    /// True when no frame is partially received (a clean place for the stream to end).
    pub fn is_idle(&self) -> bool {
        self.body.is_none() && self.skip == 0 && self.staging.len() == self.pos
    }

    /// Bytes of a large payload still to be received by the runtime, if one is in progress.
    pub fn body_wanted(&self) -> Option<u64> {
        self.body.as_ref().map(|b| b.remaining).filter(|r| *r > 0)
    }

    /// Length of the large payload in progress.
    pub fn body_len(&self) -> Option<u64> {
        self.body.as_ref().map(|b| b.header.payload_len)
    }

    /// The header and meta of the frame whose large payload is in progress.
    pub fn body_head(&self) -> Option<(&Header, &str)> {
        self.body.as_ref().map(|b| (&b.header, b.meta.as_str()))
    }

    /// The staged bytes that belong to the large payload in progress; they count as received.
    pub fn take_body_prefix(&mut self) -> &[u8] {
        let Some(body) = &mut self.body else {
            return &[];
        };
        let n = (self.staging.len() - self.pos).min(body.remaining as usize);
        body.remaining -= n as u64;
        self.pos += n;
        &self.staging[self.pos - n..self.pos]
    }

    /// The runtime received `n` more bytes of the large payload into its own buffer.
    pub fn body_received(&mut self, n: u64) {
        if let Some(body) = &mut self.body {
            body.remaining = body.remaining.saturating_sub(n);
        }
    }

    /// Parses the next complete item, if the received bytes hold one.
    pub fn next_item(&mut self) -> Result<Option<Item>, DecodeError> {
        if self.skip > 0 {
            let d = (self.staging.len() - self.pos).min(self.skip as usize);
            self.pos += d;
            self.skip -= d as u64;
            if self.skip > 0 {
                return Ok(None);
            }
        }
        if let Some(body) = &self.body {
            if body.remaining > 0 {
                return Ok(None);
            }
            // The status byte after a large payload arrives in the staging buffer.
            let status = if body.header.flags.trailer() {
                if self.pos == self.staging.len() {
                    return Ok(None);
                }
                self.pos += 1;
                self.staging[self.pos - 1]
            } else {
                0
            };
            let body = self.body.take().expect("checked above");
            let payload = Payload::External(body.header.payload_len);
            let frame = Frame {
                header: body.header,
                meta: body.meta,
                payload,
            };
            return Ok(Some(finished(frame, status)));
        }
        let avail = &self.staging[self.pos..];
        if avail.len() < HEADER_LEN {
            // A stranger (an HTTP client, a port scanner) is told apart by its first bytes,
            // without waiting for a whole header that may never come.
            let n = avail.len().min(MAGIC.len());
            if avail[..n] != MAGIC[..n] {
                return Err(
                    HeaderError::Magic([avail[0], avail.get(1).copied().unwrap_or(0)]).into(),
                );
            }
            return Ok(None);
        }
        let header = Header::decode(avail[..HEADER_LEN].try_into().expect("header length"))?;
        if header.meta_len > MAX_META {
            return Err(DecodeError::MetaTooLong(header.meta_len));
        }
        let is_call = matches!(header.kind, Kind::Request | Kind::Response | Kind::Error);
        let trailer = header.flags.trailer();
        if trailer && !is_call {
            return Err(DecodeError::Unexpected(header.kind, "with a trailer"));
        }
        // The limit is on a call's payload; meta is bounded by MAX_META above, and the payload
        // of a control frame (a hello, an announce...) by its own bound below, whatever the
        // limit: a node with a small limit still hears of many functions or peers.
        if is_call && header.payload_len > self.max_message_size {
            self.pos += HEADER_LEN;
            self.skip = header.body_len().saturating_add(u64::from(trailer));
            return Ok(Some(Item::Oversized(header)));
        }
        let head_len = HEADER_LEN + header.meta_len as usize;
        if is_call && header.payload_len > SMALL_PAYLOAD as u64 {
            if avail.len() < head_len {
                return Ok(None);
            }
            let meta = meta_str(&avail[HEADER_LEN..head_len])?;
            self.pos += head_len;
            self.body = Some(Body {
                header,
                meta,
                remaining: header.payload_len,
            });
            return Ok(Some(Item::BodyStart(header.payload_len)));
        }
        if !is_call && header.payload_len > self.control_limit {
            return Err(DecodeError::ControlTooLong(header.kind, header.payload_len));
        }
        let end = head_len + header.payload_len as usize;
        let total = end + usize::from(trailer);
        if avail.len() < total {
            // Make room for the whole frame (only control frames can exceed the usual size).
            if self.staging.capacity() - self.pos < total {
                self.staging
                    .reserve(total - (self.staging.len() - self.pos));
            }
            return Ok(None);
        }
        let meta = meta_str(&avail[HEADER_LEN..head_len])?;
        let payload = Payload::Inline(avail[head_len..end].to_vec());
        let status = if trailer { avail[end] } else { 0 };
        self.pos += total;
        let frame = Frame {
            header,
            meta,
            payload,
        };
        Ok(Some(finished(frame, status)))
    }
}

fn meta_str(b: &[u8]) -> Result<String, DecodeError> {
    Ok(std::str::from_utf8(b)
        .map_err(|_| DecodeError::Utf8("frame meta"))?
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Flags, Kind, encode_head};

    fn frame_bytes(kind: Kind, id: u64, meta: &str, payload: &[u8]) -> Vec<u8> {
        let mut v = encode_head(kind, id, 2, 0, meta, payload.len() as u64).to_vec();
        v.extend_from_slice(payload);
        v
    }

    /// Feeds `stream` to a reader in pieces of at most `step` bytes, as a kernel might; large
    /// bodies are collected the way the runtime does. Returns items and the external bodies.
    fn feed(reader: &mut FrameReader, stream: &[u8], step: usize) -> (Vec<Item>, Vec<Vec<u8>>) {
        let mut items = Vec::new();
        let mut bodies = Vec::new();
        let mut body: Option<Vec<u8>> = None;
        let mut at = 0;
        loop {
            while let Some(item) = reader.next_item().unwrap() {
                if let Item::BodyStart(_) = item {
                    body = Some(reader.take_body_prefix().to_vec());
                }
                if let Item::Frame(Frame {
                    payload: Payload::External(_),
                    ..
                })
                | Item::Aborted(Frame {
                    payload: Payload::External(_),
                    ..
                }) = &item
                {
                    bodies.push(body.take().unwrap());
                }
                items.push(item);
            }
            if at == stream.len() {
                return (items, bodies);
            }
            if let Some(want) = reader.body_wanted() {
                let n = (want as usize).min(step).min(stream.len() - at);
                body.as_mut()
                    .unwrap()
                    .extend_from_slice(&stream[at..at + n]);
                reader.body_received(n as u64);
                at += n;
                continue;
            }
            let mut t = reader.target();
            let n = t.max.min(step).min(stream.len() - at);
            t.buf.extend_from_slice(&stream[at..at + n]);
            at += n;
            reader.filled(t.buf);
        }
    }

    fn trailed(kind: Kind, id: u64, payload: &[u8], status: u8) -> Vec<u8> {
        let mut v = encode_head(kind, id, 0, Flags::TRAILER, "", payload.len() as u64).to_vec();
        v.extend_from_slice(payload);
        v.push(status);
        v
    }

    #[test]
    fn trailers_mark_complete_and_aborted_payloads() {
        let big = vec![3u8; 100_000];
        let mut stream = trailed(Kind::Response, 1, b"small", 0);
        stream.extend(trailed(Kind::Response, 2, &big, 0));
        stream.extend(trailed(Kind::Response, 3, &big, 1));
        stream.extend(trailed(Kind::Request, 4, b"cut", 9));
        stream.extend(frame_bytes(Kind::Response, 5, "", b"after"));
        for step in [1, 33, 4096, 1 << 20] {
            let mut r = FrameReader::new(1 << 30);
            let (items, bodies) = feed(&mut r, &stream, step);
            let ids: Vec<(bool, u64)> = items
                .iter()
                .filter_map(|i| match i {
                    Item::Frame(f) => Some((true, f.header.call_id)),
                    Item::Aborted(f) => Some((false, f.header.call_id)),
                    _ => None,
                })
                .collect();
            assert_eq!(
                ids,
                [(true, 1), (true, 2), (false, 3), (false, 4), (true, 5)]
            );
            assert_eq!(bodies.len(), 2);
            assert!(bodies.iter().all(|b| b == &big));
            assert!(r.is_idle());
        }
        // A trailer is only allowed where there is a payload to vouch for.
        let mut r = FrameReader::new(1 << 30);
        let mut t = r.target();
        t.buf
            .extend_from_slice(&encode_head(Kind::Announce, 0, 0, Flags::TRAILER, "", 0));
        r.filled(t.buf);
        assert!(r.next_item().is_err());
    }

    #[test]
    fn splits_small_and_large_frames_at_any_boundary() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut stream = frame_bytes(Kind::Request, 1, "echo", b"hi");
        stream.extend(frame_bytes(Kind::Request, 2, "echo", &big));
        stream.extend(frame_bytes(Kind::Response, 3, "", b""));
        // A large error travels like a large answer; a large control frame is staged whole.
        let err = vec![b'e'; 100_000];
        stream.extend(frame_bytes(Kind::Error, 4, "remote", &err));
        let names: Vec<String> = (0..5000).map(|i| format!("function_{i:05}")).collect();
        let announce = crate::handshake::encode_names(&names);
        stream.extend(frame_bytes(Kind::Announce, 0, "", &announce));
        for step in [1, 7, 31, 32, 33, 4096, 1 << 20] {
            let mut r = FrameReader::new(1 << 30);
            let (items, bodies) = feed(&mut r, &stream, step);
            assert_eq!(items.len(), 7, "step {step}");
            assert_eq!(items[1], Item::BodyStart(big.len() as u64));
            let Item::Frame(f) = &items[2] else { panic!() };
            assert_eq!((f.header.call_id, f.meta.as_str()), (2, "echo"));
            assert_eq!(f.payload, Payload::External(big.len() as u64));
            assert!(
                bodies == [big.clone(), err.clone()],
                "bodies differ at step {step}"
            );
            let Item::Frame(f) = &items[3] else { panic!() };
            assert_eq!(
                (f.header.kind, &f.payload),
                (Kind::Response, &Payload::Inline(vec![]))
            );
            assert_eq!(items[4], Item::BodyStart(err.len() as u64));
            let Item::Frame(f) = &items[6] else { panic!() };
            assert_eq!(f.payload, Payload::Inline(announce.to_vec()));
            assert!(r.is_idle());
        }
    }

    #[test]
    fn skips_oversized_frames_and_keeps_going() {
        let mut stream = frame_bytes(Kind::Request, 1, "f", &vec![7u8; 5000]);
        stream.extend(frame_bytes(Kind::Request, 2, "f", b"ok"));
        let mut r = FrameReader::new(1000);
        let (items, _) = feed(&mut r, &stream, 100);
        assert!(matches!(&items[0], Item::Oversized(h) if h.call_id == 1));
        assert!(
            matches!(&items[1], Item::Frame(f) if f.payload == Payload::Inline(b"ok".to_vec()))
        );
    }

    #[test]
    fn control_frames_are_not_held_to_the_message_limit() {
        // An announce of 2,000 functions, to a side that accepts payloads of 100 bytes.
        let names: Vec<String> = (0..2000).map(|i| format!("function_{i}")).collect();
        let announce = crate::handshake::encode_names(&names);
        let mut stream = frame_bytes(Kind::Announce, 0, "", &announce);
        stream.extend(frame_bytes(Kind::Request, 1, "f", &[7; 101]));
        let mut r = FrameReader::new(100);
        let (items, _) = feed(&mut r, &stream, 1000);
        assert!(
            matches!(&items[0], Item::Frame(f) if f.payload == Payload::Inline(announce.to_vec()))
        );
        assert!(matches!(&items[1], Item::Oversized(h) if h.call_id == 1));
        // Still bounded on their own: before the handshake, as a hello; then, as any control
        // frame.
        let mut r = FrameReader::new(1 << 30);
        let mut t = r.target();
        t.buf
            .extend(encode_head(Kind::Hello, 0, 0, 0, "", MAX_HELLO_PAYLOAD + 1).as_ref());
        r.filled(t.buf);
        assert_eq!(
            r.next_item(),
            Err(DecodeError::ControlTooLong(
                Kind::Hello,
                MAX_HELLO_PAYLOAD + 1
            ))
        );
        let mut r = FrameReader::new(100);
        r.handshake_done();
        let mut t = r.target();
        t.buf
            .extend(encode_head(Kind::Announce, 0, 0, 0, "", MAX_CONTROL_PAYLOAD + 1).as_ref());
        r.filled(t.buf);
        assert_eq!(
            r.next_item(),
            Err(DecodeError::ControlTooLong(
                Kind::Announce,
                MAX_CONTROL_PAYLOAD + 1
            ))
        );
    }

    #[test]
    fn rejects_bad_meta() {
        let mut stream = frame_bytes(Kind::Request, 1, "f", b"");
        stream[32] = 0xff;
        let mut r = FrameReader::new(1 << 20);
        let mut t = r.target();
        t.buf.extend_from_slice(&stream);
        r.filled(t.buf);
        assert_eq!(r.next_item(), Err(DecodeError::Utf8("frame meta")));
        let mut h = encode_head(Kind::Request, 1, 0, 0, "", 0).to_vec();
        h[16..20].copy_from_slice(&(MAX_META + 1).to_le_bytes());
        let mut r = FrameReader::new(1 << 20);
        let mut t = r.target();
        t.buf.extend_from_slice(&h);
        r.filled(t.buf);
        assert_eq!(r.next_item(), Err(DecodeError::MetaTooLong(MAX_META + 1)));
    }
}
