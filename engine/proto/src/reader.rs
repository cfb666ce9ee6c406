//! Splits a received byte stream into frames.
//!
//! Small frames are parsed out of one reusable staging buffer. A frame whose payload is large is
//! given a buffer of its own, sized once from the header, and the bytes that follow are received
//! straight into it: a multi-GiB payload is never copied between buffers on the way in.

use crate::frame::{Frame, HEADER_LEN, Header, HeaderError};

/// Payloads up to this size are parsed out of the staging buffer.
pub const SMALL_PAYLOAD: usize = 16 * 1024;
/// Longest meta a frame may carry.
pub const MAX_META: u32 = 16 * 1024;
/// Capacity of the staging buffer; holds the largest small frame with room to spare.
pub const STAGING: usize = 64 * 1024;

/// Why the received bytes are not a valid frame stream. Each of these closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("frame meta of {0} bytes exceeds the {MAX_META}-byte limit")]
    MetaTooLong(u32),
    #[error("{0} is not valid UTF-8")]
    Utf8(&'static str),
    #[error("bad handshake: {0}")]
    Handshake(&'static str),
    #[error("cannot allocate {0} bytes for a payload")]
    OutOfMemory(u64),
    #[error("unexpected {0:?} frame {1}")]
    Unexpected(crate::frame::Kind, &'static str),
}

/// One item read off the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    Frame(Frame),
    /// A frame larger than the reader's limit. Its bytes are being skipped, never stored.
    Oversized(Header),
}

/// Where the next receive should write: the spare capacity of `buf`, at most `max` bytes.
#[derive(Debug)]
pub struct RecvTarget {
    pub buf: Vec<u8>,
    pub max: usize,
}

#[derive(Debug)]
struct Large {
    header: Header,
    meta: String,
    payload: Vec<u8>,
}

/// Incremental frame parser over owned buffers (hand a buffer to the kernel, get it back).
#[derive(Debug)]
pub struct FrameReader {
    max_message_size: u64,
    staging: Vec<u8>,
    pos: usize,
    large: Option<Large>,
    skip: u64,
    /// Which buffer is out with the kernel right now.
    lent: Option<Lent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lent {
    Staging,
    Payload,
}

impl FrameReader {
    pub fn new(max_message_size: u64) -> FrameReader {
        FrameReader {
            max_message_size,
            staging: Vec::with_capacity(STAGING),
            pos: 0,
            large: None,
            skip: 0,
            lent: None,
        }
    }

    /// Lends out the buffer the next receive should fill.
    ///
    /// # Panics
    /// If the previous target was not returned with [`FrameReader::filled`] (a runtime bug, not
    /// something a peer can cause).
    pub fn target(&mut self) -> RecvTarget {
        assert!(self.lent.is_none(), "receive target lent twice");
        if let Some(large) = &mut self.large {
            let max = large.header.payload_len as usize - large.payload.len();
            if max > 0 {
                self.lent = Some(Lent::Payload);
                return RecvTarget {
                    buf: std::mem::take(&mut large.payload),
                    max,
                };
            }
        }
        if self.pos > 0 {
            self.staging.copy_within(self.pos.., 0);
            self.staging.truncate(self.staging.len() - self.pos);
            self.pos = 0;
        }
        self.lent = Some(Lent::Staging);
        let max = STAGING - self.staging.len();
        RecvTarget {
            buf: std::mem::take(&mut self.staging),
            max,
        }
    }

    /// Takes back the buffer lent by [`FrameReader::target`], with the received bytes appended.
    pub fn filled(&mut self, buf: Vec<u8>) {
        match self.lent.take() {
            Some(Lent::Payload) => {
                self.large
                    .as_mut()
                    .expect("payload lent without a large frame")
                    .payload = buf
            }
            Some(Lent::Staging) => self.staging = buf,
            None => panic!("receive buffer returned but none was lent"),
        }
    }

    /// True when no frame is partially received (a clean place for the stream to end).
    pub fn is_idle(&self) -> bool {
        self.large.is_none() && self.skip == 0 && self.staging.len() == self.pos
    }

    /// Parses the next complete item, if the received bytes hold one.
    pub fn next_item(&mut self) -> Result<Option<Item>, DecodeError> {
        loop {
            if self.skip > 0 {
                let d = (self.staging.len() - self.pos).min(self.skip as usize);
                self.pos += d;
                self.skip -= d as u64;
                if self.skip > 0 {
                    return Ok(None);
                }
            }
            if let Some(large) = &self.large {
                if large.payload.len() as u64 == large.header.payload_len {
                    let large = self.large.take().expect("checked above");
                    return Ok(Some(Item::Frame(Frame {
                        header: large.header,
                        meta: large.meta,
                        payload: large.payload,
                    })));
                }
                return Ok(None);
            }
            let avail = &self.staging[self.pos..];
            if avail.len() < HEADER_LEN {
                return Ok(None);
            }
            let header = Header::decode(avail[..HEADER_LEN].try_into().expect("header length"))?;
            if header.meta_len > MAX_META {
                return Err(DecodeError::MetaTooLong(header.meta_len));
            }
            if header.body_len() > self.max_message_size {
                self.pos += HEADER_LEN;
                self.skip = header.body_len();
                return Ok(Some(Item::Oversized(header)));
            }
            let head_len = HEADER_LEN + header.meta_len as usize;
            if avail.len() < head_len {
                return Ok(None);
            }
            let meta = std::str::from_utf8(&avail[HEADER_LEN..head_len])
                .map_err(|_| DecodeError::Utf8("frame meta"))?
                .to_owned();
            let payload_len = header.payload_len as usize;
            if payload_len <= SMALL_PAYLOAD {
                if avail.len() < head_len + payload_len {
                    return Ok(None);
                }
                let payload = avail[head_len..head_len + payload_len].to_vec();
                self.pos += head_len + payload_len;
                return Ok(Some(Item::Frame(Frame {
                    header,
                    meta,
                    payload,
                })));
            }
            let mut payload = Vec::new();
            payload
                .try_reserve_exact(payload_len)
                .map_err(|_| DecodeError::OutOfMemory(header.payload_len))?;
            let have = (avail.len() - head_len).min(payload_len);
            payload.extend_from_slice(&avail[head_len..head_len + have]);
            self.pos += head_len + have;
            self.large = Some(Large {
                header,
                meta,
                payload,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Kind, encode_head};

    fn frame_bytes(kind: Kind, id: u64, meta: &str, payload: &[u8]) -> Vec<u8> {
        let mut v = encode_head(kind, id, 2, 0, meta, payload.len() as u64).to_vec();
        v.extend_from_slice(payload);
        v
    }

    /// Feeds `stream` to a reader in pieces of at most `step` bytes, as a kernel might.
    fn feed(reader: &mut FrameReader, stream: &[u8], step: usize) -> Vec<Item> {
        let mut items = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            let mut t = reader.target();
            let n = t.max.min(step).min(stream.len() - at);
            t.buf.extend_from_slice(&stream[at..at + n]);
            at += n;
            reader.filled(t.buf);
            while let Some(item) = reader.next_item().unwrap() {
                items.push(item);
            }
        }
        items
    }

    #[test]
    fn splits_small_and_large_frames_at_any_boundary() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut stream = frame_bytes(Kind::Request, 1, "echo", b"hi");
        stream.extend(frame_bytes(Kind::Request, 2, "echo", &big));
        stream.extend(frame_bytes(Kind::Response, 3, "", b""));
        for step in [1, 7, 31, 32, 33, 4096, 1 << 20] {
            let mut r = FrameReader::new(1 << 30);
            let items = feed(&mut r, &stream, step);
            assert_eq!(items.len(), 3, "step {step}");
            let Item::Frame(f) = &items[1] else { panic!() };
            assert_eq!(f.header.call_id, 2);
            assert_eq!(f.meta, "echo");
            assert_eq!(f.payload, big);
            let Item::Frame(f) = &items[2] else { panic!() };
            assert_eq!((f.header.kind, f.payload.len()), (Kind::Response, 0));
            assert!(r.is_idle());
        }
    }

    #[test]
    fn skips_oversized_frames_and_keeps_going() {
        let mut stream = frame_bytes(Kind::Request, 1, "f", &vec![7u8; 5000]);
        stream.extend(frame_bytes(Kind::Request, 2, "f", b"ok"));
        let mut r = FrameReader::new(1000);
        let items = feed(&mut r, &stream, 100);
        assert!(matches!(&items[0], Item::Oversized(h) if h.call_id == 1));
        assert!(matches!(&items[1], Item::Frame(f) if f.payload == b"ok"));
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
