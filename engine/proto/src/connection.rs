//! The state of one connection: handshake, then requests and responses both ways.
//!
//! A [`Connection`] is fed received bytes ([`Connection::recv_target`] / [`Connection::recv_done`])
//! and produces [`Event`]s for the runtime, and the byte buffers to send
//! ([`Connection::poll_transmit`]). The runtime decides what the events mean to its node.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::frame::{Flags, Kind, Payload, encode_head, error_code};
use crate::handshake::{Hello, add_names, decode_names, decode_peers, encode_names};
use crate::reader::{DecodeError, FrameReader, Item, RecvTarget};

/// Which end of the connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends `Hello`, waits for `Welcome`.
    Client,
    /// Waits for `Hello`, answers `Welcome`.
    Server,
}

/// This side's identity, announced in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub name: String,
    pub functions: Vec<String>,
    pub max_message_size: u64,
    /// A shared secret (empty: none): a client sends it in its hello; a server refuses a
    /// hello that does not carry the same one, before any call is read.
    pub token: Vec<u8>,
    /// This side is a Router (a server that forwards between its clients): its `Welcome` says
    /// so, and requests on the connection name their target peer.
    pub router: bool,
}

/// The other side, as it announced itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub functions: Vec<String>,
    pub max_message_size: u64,
    /// The peer is a Router (only a server's `Welcome` can say so).
    pub router: bool,
}

/// Something the runtime must act on.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The handshake completed.
    Open(Peer),
    /// The peer calls one of our functions. On a routed connection (a Router's, or a client's
    /// of a Router) `peer` is the other end of the call: the target when a client sends to a
    /// Router, the caller when a Router delivers to a client.
    Request {
        call_id: u64,
        peer: Option<String>,
        name: String,
        serde: u8,
        flags: Flags,
        payload: Payload,
    },
    /// The result of one of our calls.
    Response {
        call_id: u64,
        serde: u8,
        flags: Flags,
        payload: Payload,
    },
    /// One of our calls failed on the other side.
    Error {
        call_id: u64,
        code: String,
        payload: Payload,
    },
    /// The peer exports more functions now.
    Announce(Vec<String>),
    /// The peer is closing, and says why.
    Goodbye(String),
    /// From a Router: peers reachable through it (the first one after the handshake lists every
    /// peer present then, possibly none).
    Joined(Vec<Peer>),
    /// From a Router: a peer left.
    Left(String),
    /// From a Router: a peer exports more functions now.
    PeerAnnounce { peer: String, names: Vec<String> },
    /// A `Request`, `Response` or `Error` whose payload its sender lost midway (its trailer
    /// says so): never to be used. The payload is only there to be released.
    Aborted {
        kind: Kind,
        call_id: u64,
        payload: Payload,
    },
}

/// Why a frame could not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    #[error("the handshake has not completed")]
    NotOpen,
    #[error("message of {size} bytes exceeds the peer's limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Handshake,
    Open,
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Connection {
    role: Role,
    state: State,
    local: Local,
    peer: Option<Peer>,
    reader: FrameReader,
    out: VecDeque<Out>,
    events: VecDeque<Event>,
    /// Requests carry `peer \0 function` in their meta (see [`Event::Request`]).
    routed: bool,
    /// Payload bytes still to come of the frame being streamed out (see
    /// [`Connection::begin_stream`]); frames queued meanwhile wait in `held`.
    streaming: Option<u64>,
    held: VecDeque<Bytes>,
    /// What `out` and `held` weigh (see [`Connection::queued`]).
    out_weight: usize,
    held_weight: usize,
}

/// What a queued buffer weighs beyond its bytes (its place in the queue and its allocation),
/// so that many tiny frames count too.
const BUF_WEIGHT: usize = 64;

fn weight(b: &Bytes) -> usize {
    b.len() + BUF_WEIGHT
}

/// What is queued to be sent: bytes, or a stretch of a streamed payload that the runtime moves
/// from elsewhere (see [`Connection::stream_spliced`]).
#[derive(Debug)]
enum Out {
    Bytes(Bytes),
    Spliced(u64),
}

impl Out {
    fn weight(&self) -> usize {
        match self {
            Out::Bytes(b) => weight(b),
            Out::Spliced(n) => usize::try_from(*n).unwrap_or(usize::MAX) + BUF_WEIGHT,
        }
    }
}

impl Connection {
    pub fn new(role: Role, local: Local) -> Connection {
        let mut c = Connection {
            role,
            state: State::Handshake,
            reader: FrameReader::new(local.max_message_size),
            routed: role == Role::Server && local.router,
            local,
            peer: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
            streaming: None,
            held: VecDeque::new(),
            out_weight: 0,
            held_weight: 0,
        };
        if role == Role::Client {
            c.push_hello(Kind::Hello);
        }
        c
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// True on a Router's connections and on a client's connection to a Router.
    pub fn is_routed(&self) -> bool {
        self.routed
    }

    pub fn peer(&self) -> Option<&Peer> {
        self.peer.as_ref()
    }

    pub fn local(&self) -> &Local {
        &self.local
    }

    fn push_hello(&mut self, kind: Kind) {
        let token = if kind == Kind::Hello {
            self.local.token.clone()
        } else {
            Vec::new()
        };
        let flags = if kind == Kind::Welcome && self.local.router {
            Flags::ROUTER
        } else {
            0
        };
        let body = Hello {
            max_message_size: self.local.max_message_size,
            functions: self.local.functions.clone(),
            token,
        }
        .encode();
        let head = encode_head(kind, 0, 0, flags, &self.local.name, body.len() as u64);
        self.push_out(head);
        self.push_out(body);
    }

    fn push_out(&mut self, b: Bytes) {
        self.out_weight += weight(&b);
        self.out.push_back(Out::Bytes(b));
    }

    /// A frame never interrupts one that is being streamed out: it waits for its end.
    fn push_out_or_hold(&mut self, b: Bytes) {
        if self.streaming.is_some() {
            self.held_weight += weight(&b);
            self.held.push_back(b);
        } else {
            self.push_out(b);
        }
    }

    /// The weight of what is queued to be sent (bytes, plus a little per buffer): `sendable`
    /// only what may go now, else also the frames held behind a streamed one.
    pub fn queued(&self, sendable: bool) -> usize {
        if sendable {
            self.out_weight
        } else {
            self.out_weight + self.held_weight
        }
    }

    /// The buffer the next receive should fill (see [`FrameReader::target`]).
    pub fn recv_target(&mut self) -> RecvTarget {
        self.reader.target()
    }

    /// Takes back the receive buffer and parses every complete frame in it.
    pub fn recv_done(&mut self, buf: Vec<u8>) -> Result<(), DecodeError> {
        self.reader.filled(buf);
        self.parse()
    }

    /// Bytes of a large payload the runtime still has to receive into its own buffer (see
    /// [`crate::reader`]); while this is `Some`, receive into that buffer, not the staging one.
    pub fn body_wanted(&self) -> Option<u64> {
        self.reader.body_wanted()
    }

    /// Length of the large payload in progress.
    pub fn body_len(&self) -> Option<u64> {
        self.reader.body_len()
    }

    /// The header and meta of the frame whose large payload is in progress (a Router routes
    /// it before the payload is there).
    pub fn body_head(&self) -> Option<(&crate::frame::Header, &str)> {
        self.reader.body_head()
    }

    /// Staged bytes that start the large payload in progress: copy them to its buffer first.
    pub fn take_body_prefix(&mut self) -> &[u8] {
        self.reader.take_body_prefix()
    }

    /// The runtime received `n` more bytes of the large payload; parse on.
    pub fn body_received(&mut self, n: u64) -> Result<(), DecodeError> {
        self.reader.body_received(n);
        self.parse()
    }

    fn parse(&mut self) -> Result<(), DecodeError> {
        while let Some(item) = self.reader.next_item()? {
            match item {
                // A large payload before the handshake is refused before any memory is set
                // aside for it.
                Item::BodyStart(_) if self.state != State::Open => {
                    return Err(DecodeError::Handshake(
                        "a call arrived before the handshake",
                    ));
                }
                // The runtime must provide a buffer before parsing can go on.
                Item::BodyStart(_) => break,
                Item::Frame(f) => self.handle_frame(f)?,
                Item::Aborted(f) if self.state == State::Open => {
                    self.events.push_back(Event::Aborted {
                        kind: f.header.kind,
                        call_id: f.header.call_id,
                        payload: f.payload,
                    });
                }
                Item::Aborted(f) => {
                    return Err(DecodeError::Unexpected(
                        f.header.kind,
                        "before the handshake",
                    ));
                }
                Item::Oversized(h) => self.oversized(h)?,
            }
        }
        Ok(())
    }

    /// A frame over our limit, whose bytes the reader skips: a request is refused with an
    /// error its caller sees, an answer becomes that error locally; any other kind (a hello,
    /// an announce...) cannot be skipped without losing the connection's meaning.
    fn oversized(&mut self, h: crate::frame::Header) -> Result<(), DecodeError> {
        if self.state != State::Open
            || !matches!(h.kind, Kind::Request | Kind::Response | Kind::Error)
        {
            return Err(DecodeError::Unexpected(
                h.kind,
                "larger than this side's message limit",
            ));
        }
        let what = if h.kind == Kind::Request {
            "message"
        } else {
            "response"
        };
        let msg = format!(
            "{what} of {} bytes exceeds the limit of {} bytes of {:?}",
            h.payload_len, self.local.max_message_size, self.local.name
        );
        if h.kind != Kind::Request {
            self.events.push_back(Event::Error {
                call_id: h.call_id,
                code: error_code::TOO_LARGE.to_owned(),
                payload: Payload::Inline(msg.into_bytes()),
            });
        } else if !h.flags.no_reply() {
            self.send_error(h.call_id, error_code::TOO_LARGE, Bytes::from(msg));
        }
        Ok(())
    }

    /// True when the stream may end here without losing part of a frame.
    pub fn recv_idle(&self) -> bool {
        self.reader.is_idle()
    }

    fn handle_frame(&mut self, f: crate::frame::Frame) -> Result<(), DecodeError> {
        let h = f.header;
        match (self.state, self.role, h.kind) {
            (State::Handshake, Role::Server, Kind::Hello)
            | (State::Handshake, Role::Client, Kind::Welcome) => {
                let hello = Hello::decode(f.payload.inline())?;
                if self.role == Role::Server && !same_secret(&self.local.token, &hello.token) {
                    return Err(DecodeError::Handshake("authentication failed"));
                }
                // A Router's peers are addressed by name, in metas where NUL separates names.
                if self.routed && (f.meta.is_empty() || f.meta.contains('\0')) {
                    return Err(DecodeError::Handshake(
                        "a Router's peers need a non-empty name without NUL",
                    ));
                }
                let router = self.role == Role::Client && h.flags.router();
                let peer = Peer {
                    name: f.meta,
                    functions: hello.functions,
                    max_message_size: hello.max_message_size,
                    router,
                };
                if router {
                    self.routed = true;
                }
                self.peer = Some(peer.clone());
                self.state = State::Open;
                self.reader.handshake_done();
                if self.role == Role::Server {
                    self.push_hello(Kind::Welcome);
                }
                self.events.push_back(Event::Open(peer));
            }
            (_, _, Kind::Goodbye) => self.events.push_back(Event::Goodbye(f.meta)),
            (State::Handshake, _, k) => {
                return Err(DecodeError::Unexpected(k, "before the handshake"));
            }
            (State::Open, _, Kind::Hello | Kind::Welcome) => {
                return Err(DecodeError::Unexpected(h.kind, "after the handshake"));
            }
            (State::Open, _, Kind::Request) => {
                let (peer, name) = if self.routed {
                    let Some((peer, name)) = f.meta.split_once('\0') else {
                        return Err(DecodeError::Unexpected(
                            Kind::Request,
                            "without a peer name on a routed connection",
                        ));
                    };
                    (Some(peer.to_owned()), name.to_owned())
                } else {
                    (None, f.meta)
                };
                self.events.push_back(Event::Request {
                    call_id: h.call_id,
                    peer,
                    name,
                    serde: h.serde,
                    flags: h.flags.without_wire(),
                    payload: f.payload,
                })
            }
            (State::Open, _, Kind::Response) => self.events.push_back(Event::Response {
                call_id: h.call_id,
                serde: h.serde,
                flags: h.flags.without_wire(),
                payload: f.payload,
            }),
            (State::Open, _, Kind::Error) => self.events.push_back(Event::Error {
                call_id: h.call_id,
                code: f.meta,
                payload: f.payload,
            }),
            (State::Open, Role::Client, Kind::Announce) if self.routed => {
                let names = decode_names(f.payload.inline())?;
                self.events.push_back(Event::PeerAnnounce {
                    peer: f.meta,
                    names,
                });
            }
            (State::Open, Role::Client, Kind::Joined) if self.routed => {
                let peers = decode_peers(f.payload.inline())?;
                self.events.push_back(Event::Joined(peers));
            }
            (State::Open, Role::Client, Kind::Left) if self.routed => {
                self.events.push_back(Event::Left(f.meta));
            }
            (State::Open, _, Kind::Joined | Kind::Left) => {
                return Err(DecodeError::Unexpected(
                    h.kind,
                    "from a peer that is not a Router",
                ));
            }
            (State::Open, _, Kind::Announce) => {
                let names = decode_names(f.payload.inline())?;
                if let Some(p) = &mut self.peer {
                    add_names(&mut p.functions, &names);
                }
                self.events.push_back(Event::Announce(names));
            }
        }
        Ok(())
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn check_size(&self, payload: usize) -> Result<(), SendError> {
        let peer = self.peer.as_ref().ok_or(SendError::NotOpen)?;
        let size = payload as u64;
        if size > peer.max_message_size {
            return Err(SendError::TooLarge {
                size,
                limit: peer.max_message_size,
            });
        }
        Ok(())
    }

    /// Queues a call of the peer's function `name`.
    pub fn request(
        &mut self,
        call_id: u64,
        name: &str,
        serde: u8,
        flags: u8,
        payload: Bytes,
    ) -> Result<(), SendError> {
        self.check_size(payload.len())?;
        self.push(Kind::Request, call_id, serde, flags, name, payload);
        Ok(())
    }

    /// Queues the result of the peer's call `call_id`.
    pub fn respond(
        &mut self,
        call_id: u64,
        serde: u8,
        flags: u8,
        payload: Bytes,
    ) -> Result<(), SendError> {
        if let Err(SendError::TooLarge { size, limit }) = self.check_size(payload.len()) {
            let msg = format!("result of {size} bytes exceeds the caller's limit of {limit} bytes");
            self.send_error(call_id, error_code::TOO_LARGE, Bytes::from(msg));
            return Err(SendError::TooLarge { size, limit });
        }
        self.push(Kind::Response, call_id, serde, flags, "", payload);
        Ok(())
    }

    /// Queues an error answer to the peer's call `call_id`.
    pub fn send_error(&mut self, call_id: u64, code: &str, payload: Bytes) {
        self.push(Kind::Error, call_id, 0, 0, code, payload);
    }

    /// Tells the peer about functions exported since the handshake.
    pub fn announce(&mut self, names: &[String]) {
        self.local.functions.extend(names.iter().cloned());
        // Whatever is in `local.functions` before our hello is encoded travels in the hello; a
        // client's hello is queued at construction, a server's when the peer's hello arrives.
        if self.role == Role::Client || self.state == State::Open {
            self.push(Kind::Announce, 0, 0, 0, "", encode_names(names));
        }
    }

    /// Queues any frame (a Router forwarding a call, or telling about peers).
    pub fn queue_frame(
        &mut self,
        kind: Kind,
        call_id: u64,
        serde: u8,
        flags: u8,
        meta: &str,
        payload: Bytes,
    ) {
        self.push(kind, call_id, serde, flags, meta, payload);
    }

    /// Queues a goodbye; the runtime closes the connection once it is sent.
    pub fn goodbye(&mut self, reason: &str) {
        self.push(Kind::Goodbye, 0, 0, 0, reason, Bytes::new());
    }

    fn push(&mut self, kind: Kind, call_id: u64, serde: u8, flags: u8, meta: &str, payload: Bytes) {
        let head = encode_head(kind, call_id, serde, flags, meta, payload.len() as u64);
        self.push_out_or_hold(head);
        if !payload.is_empty() {
            self.push_out_or_hold(payload);
        }
    }

    /// Starts sending a `Request`, `Response` or `Error` whose `len`-byte payload is not all
    /// there yet (a Router forwarding while it receives): the header goes out now with the
    /// [`Flags::TRAILER`] flag, the payload follows through [`Connection::stream_data`], and
    /// [`Connection::end_stream`] or [`Connection::abort_stream`] ends it with its status byte.
    /// Frames queued in between are sent after it.
    pub fn begin_stream(
        &mut self,
        kind: Kind,
        call_id: u64,
        serde: u8,
        flags: u8,
        meta: &str,
        len: u64,
    ) {
        debug_assert!(self.streaming.is_none(), "one streamed frame at a time");
        self.push(
            kind,
            call_id,
            serde,
            flags | Flags::TRAILER,
            meta,
            Bytes::new(),
        );
        // `push` wrote a header for an empty payload: patch in the real length (the weight
        // stays the same).
        let Some(Out::Bytes(head)) = self.out.pop_back() else {
            unreachable!("the header was just pushed")
        };
        let mut head = head.to_vec();
        head[24..32].copy_from_slice(&len.to_le_bytes());
        self.out.push_back(Out::Bytes(Bytes::from(head)));
        self.streaming = Some(len);
    }

    /// Whether a streamed frame is in progress.
    pub fn is_streaming(&self) -> bool {
        self.streaming.is_some()
    }

    /// The next bytes of the payload being streamed out (extra bytes are dropped).
    pub fn stream_data(&mut self, mut data: Bytes) {
        let Some(left) = self.streaming.as_mut() else {
            return;
        };
        data.truncate((*left).min(usize::MAX as u64) as usize);
        *left -= data.len() as u64;
        if !data.is_empty() {
            self.push_out(data);
        }
    }

    /// The next `n` bytes of the payload being streamed out do not pass through here: the
    /// runtime moves them to the socket itself (a Router splicing them from the sender's
    /// socket) when [`Connection::take_spliced`] says their turn came. Extra bytes are not
    /// counted.
    pub fn stream_spliced(&mut self, n: u64) {
        let Some(left) = self.streaming.as_mut() else {
            return;
        };
        let n = n.min(*left);
        *left -= n;
        if n > 0 {
            let item = Out::Spliced(n);
            self.out_weight += item.weight();
            self.out.push_back(item);
        }
    }

    /// Ends the streamed frame: its payload is complete.
    pub fn end_stream(&mut self) {
        self.finish_stream(0);
    }

    /// Ends the streamed frame as lost: the rest of its length is filled with zeros and its
    /// status byte tells the receiver to drop it.
    pub fn abort_stream(&mut self) {
        static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
        while let Some(left) = self.streaming.filter(|l| *l > 0) {
            let n = left.min(ZEROS.len() as u64) as usize;
            self.stream_data(Bytes::from_static(&ZEROS[..n]));
        }
        self.finish_stream(1);
    }

    fn finish_stream(&mut self, status: u8) {
        match self.streaming {
            None => return,
            // A payload that fell short can only be ended as lost: the frame must stay whole.
            Some(left) if left > 0 && status == 0 => return self.abort_stream(),
            Some(_) => self.streaming = None,
        }
        self.push_out(Bytes::from(vec![status]));
        self.out.extend(self.held.drain(..).map(Out::Bytes));
        self.out_weight += std::mem::take(&mut self.held_weight);
    }

    /// Moves up to `max` queued buffers to `out`, in order, stopping at bytes the runtime
    /// sends itself (see [`Connection::take_spliced`]). Returns how many were moved.
    pub fn poll_transmit(&mut self, out: &mut Vec<Bytes>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            match self.out.pop_front() {
                Some(Out::Bytes(b)) => {
                    self.out_weight -= weight(&b);
                    out.push(b);
                    n += 1;
                }
                Some(other) => {
                    self.out.push_front(other);
                    break;
                }
                None => break,
            }
        }
        n
    }

    /// When the next bytes to send are ones the runtime moves itself ([`Connection::stream_spliced`]):
    /// how many. They count as sent from here on.
    pub fn take_spliced(&mut self) -> Option<u64> {
        match self.out.front() {
            Some(Out::Spliced(n)) => {
                let n = *n;
                let item = self.out.pop_front().expect("just looked");
                self.out_weight -= item.weight();
                Some(n)
            }
            _ => None,
        }
    }

    pub fn has_transmit(&self) -> bool {
        !self.out.is_empty()
    }
}

/// Compares a required token with the one given, in time that depends only on their lengths.
fn same_secret(required: &[u8], given: &[u8]) -> bool {
    if required.is_empty() {
        return true;
    }
    required.len() == given.len()
        && required
            .iter()
            .zip(given)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(name: &str, functions: &[&str], max: u64) -> Local {
        Local {
            name: name.into(),
            functions: functions.iter().map(|s| s.to_string()).collect(),
            max_message_size: max,
            token: Vec::new(),
            router: false,
        }
    }

    /// Moves every queued byte from `a` to `b` in chunks of `step`, like a socket pair would.
    fn pump(a: &mut Connection, b: &mut Connection, step: usize) {
        let mut bufs = Vec::new();
        while a.poll_transmit(&mut bufs, 16) > 0 {}
        let stream: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let mut at = 0;
        while at < stream.len() {
            let mut t = b.recv_target();
            let n = t.max.min(step).min(stream.len() - at);
            t.buf.extend_from_slice(&stream[at..at + n]);
            at += n;
            b.recv_done(t.buf).unwrap();
        }
    }

    fn events(c: &mut Connection) -> Vec<Event> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    #[test]
    fn handshake_then_calls_both_ways() {
        let mut client = Connection::new(Role::Client, local("cli", &[], 1 << 20));
        let mut server = Connection::new(Role::Server, local("svc", &["add"], 1 << 20));
        assert_eq!(
            client.request(1, "add", 2, 0, Bytes::new()),
            Err(SendError::NotOpen)
        );
        pump(&mut client, &mut server, 5);
        assert_eq!(
            events(&mut server),
            vec![Event::Open(Peer {
                name: "cli".into(),
                functions: vec![],
                max_message_size: 1 << 20,
                router: false,
            })]
        );
        pump(&mut server, &mut client, 3);
        assert!(
            matches!(&events(&mut client)[..], [Event::Open(p)] if p.name == "svc" && p.functions == ["add"])
        );

        client
            .request(u64::MAX, "add", 2, 0, Bytes::from_static(b"args"))
            .unwrap();
        pump(&mut client, &mut server, 1000);
        let ev = events(&mut server);
        assert_eq!(
            ev,
            vec![Event::Request {
                call_id: u64::MAX,
                peer: None,
                name: "add".into(),
                serde: 2,
                flags: Flags(0),
                payload: Payload::Inline(b"args".to_vec())
            }]
        );
        server
            .respond(u64::MAX, 2, Flags::TEXT, Bytes::from_static(b"3"))
            .unwrap();
        server.announce(&["late".into()]);
        pump(&mut server, &mut client, 2);
        let ev = events(&mut client);
        assert_eq!(
            ev[0],
            Event::Response {
                call_id: u64::MAX,
                serde: 2,
                flags: Flags(Flags::TEXT),
                payload: Payload::Inline(b"3".to_vec())
            }
        );
        assert_eq!(ev[1], Event::Announce(vec!["late".into()]));
        assert_eq!(client.peer().unwrap().functions, ["add", "late"]);
    }

    #[test]
    fn size_limits_are_enforced_both_ways() {
        let mut client = Connection::new(Role::Client, local("cli", &[], 100));
        let mut server = Connection::new(Role::Server, local("svc", &["f"], 1000));
        pump(&mut client, &mut server, 64);
        pump(&mut server, &mut client, 64);
        events(&mut client);
        events(&mut server);
        // The sender refuses what the receiver announced it would refuse.
        assert_eq!(
            client.request(1, "f", 0, 0, Bytes::from(vec![0; 2000])),
            Err(SendError::TooLarge {
                size: 2000,
                limit: 1000
            })
        );
        // A result too large for the caller becomes an error answer.
        assert!(server.respond(9, 0, 0, Bytes::from(vec![0; 500])).is_err());
        pump(&mut server, &mut client, 64);
        assert!(
            matches!(&events(&mut client)[..], [Event::Error { call_id: 9, code, .. }] if code == "too-large")
        );
    }

    #[test]
    fn a_server_with_a_token_refuses_hellos_without_it() {
        let mut with = local("svc", &["f"], 1000);
        with.token = b"open sesame".to_vec();
        for (given, ok) in [
            (&b""[..], false),
            (&b"open sesamE"[..], false),
            (&b"open sesame"[..], true),
        ] {
            let mut server = Connection::new(Role::Server, with.clone());
            let mut cli = local("cli", &[], 1000);
            cli.token = given.to_vec();
            let mut client = Connection::new(Role::Client, cli);
            let mut bufs = Vec::new();
            while client.poll_transmit(&mut bufs, 16) > 0 {}
            let mut t = server.recv_target();
            for b in &bufs {
                t.buf.extend_from_slice(b);
            }
            let r = server.recv_done(t.buf);
            assert_eq!(r.is_ok(), ok, "token {given:?}");
            if !ok {
                assert_eq!(r, Err(DecodeError::Handshake("authentication failed")));
            }
        }
    }

    #[test]
    fn streamed_frames_hold_others_back_and_end_with_a_status() {
        let mut client = Connection::new(Role::Client, local("cli", &[], 1 << 20));
        let mut server = Connection::new(Role::Server, local("svc", &["f"], 1 << 20));
        pump(&mut client, &mut server, 64);
        pump(&mut server, &mut client, 64);
        events(&mut client);
        server.begin_stream(Kind::Response, 9, 0, 0, "", 5);
        assert!(server.is_streaming());
        server.send_error(8, error_code::REMOTE, Bytes::from_static(b"held"));
        server.stream_data(Bytes::from_static(b"he"));
        server.stream_data(Bytes::from_static(b"llo, world"));
        server.end_stream();
        server.begin_stream(Kind::Response, 10, 0, 0, "", 4000);
        server.stream_data(Bytes::from(vec![1u8; 1000]));
        server.abort_stream();
        pump(&mut server, &mut client, 9);
        let ev = events(&mut client);
        assert_eq!(ev.len(), 3, "{ev:?}");
        assert!(
            matches!(&ev[0], Event::Response { call_id: 9, payload: Payload::Inline(p), .. } if p == b"hello")
        );
        assert!(matches!(&ev[1], Event::Error { call_id: 8, .. }));
        // The rest of the aborted payload was zeros; the receiver only releases it.
        assert!(matches!(
            &ev[2],
            Event::Aborted { kind: Kind::Response, call_id: 10, payload: Payload::Inline(p) }
                if p.len() == 4000 && p[..1000].iter().all(|b| *b == 1) && p[1000..].iter().all(|b| *b == 0)
        ));
    }

    #[test]
    fn spliced_stretches_keep_their_place_in_the_stream() {
        let mut client = Connection::new(Role::Client, local("cli", &[], 1 << 20));
        let mut server = Connection::new(Role::Server, local("svc", &["f"], 1 << 20));
        pump(&mut client, &mut server, 64);
        pump(&mut server, &mut client, 64);
        events(&mut client);
        server.begin_stream(Kind::Response, 9, 0, 0, "", 10);
        server.stream_data(Bytes::from_static(b"ab"));
        server.stream_spliced(5);
        server.send_error(8, error_code::REMOTE, Bytes::from_static(b"held"));
        server.stream_data(Bytes::from_static(b"hij"));
        // Only what the frame still lacks counts.
        server.stream_spliced(7);
        server.end_stream();
        let before = server.queued(true);
        // The runtime sends the bytes queued before the stretch, then the stretch itself
        // (here: "cdefg" from elsewhere), then the rest.
        let mut wire = Vec::new();
        let mut bufs = Vec::new();
        while server.poll_transmit(&mut bufs, 16) > 0 {}
        assert_eq!(server.take_spliced(), Some(5));
        assert!(server.queued(true) < before - 5);
        wire.extend(bufs.drain(..).flat_map(|b| b.to_vec()));
        wire.extend_from_slice(b"cdefg");
        while server.poll_transmit(&mut bufs, 16) > 0 {}
        assert_eq!(server.take_spliced(), None);
        assert!(!server.has_transmit());
        wire.extend(bufs.drain(..).flat_map(|b| b.to_vec()));
        let mut t = client.recv_target();
        t.buf.extend_from_slice(&wire);
        client.recv_done(t.buf).unwrap();
        let ev = events(&mut client);
        assert!(
            matches!(&ev[0], Event::Response { call_id: 9, payload: Payload::Inline(p), .. } if p == b"abcdefghij"),
            "{ev:?}"
        );
        assert!(matches!(&ev[1], Event::Error { call_id: 8, .. }), "{ev:?}");
    }

    #[test]
    fn queued_weighs_what_waits_to_be_sent_and_what_is_held() {
        let mut server = Connection::new(Role::Server, local("svc", &["f"], 1 << 30));
        assert_eq!(server.queued(false), 0);
        server.queue_frame(Kind::Response, 1, 0, 0, "", Bytes::from(vec![0u8; 1000]));
        let one = server.queued(true);
        assert!(one >= 1000 + crate::frame::HEADER_LEN, "{one}");
        server.begin_stream(Kind::Response, 2, 0, 0, "", 3000);
        server.stream_data(Bytes::from(vec![1u8; 2000]));
        // Queued while the stream is on: held, so not sendable yet.
        server.queue_frame(Kind::Response, 3, 0, 0, "", Bytes::from(vec![2u8; 5000]));
        let sendable = server.queued(true);
        assert!(
            sendable >= one + 2000 + crate::frame::HEADER_LEN,
            "{sendable}"
        );
        assert!(
            server.queued(false) >= sendable + 5000,
            "the held frame counts in all"
        );
        server.stream_data(Bytes::from(vec![1u8; 1000]));
        server.end_stream();
        // The stream ended: everything may go now.
        assert_eq!(server.queued(true), server.queued(false));
        let mut bufs = Vec::new();
        server.poll_transmit(&mut bufs, 3);
        let sent: usize = bufs.iter().map(|b| b.len() + BUF_WEIGHT).sum();
        let left = server.queued(false);
        while server.poll_transmit(&mut bufs, 16) > 0 {}
        assert_eq!(server.queued(false), 0);
        assert_eq!(
            left + sent,
            bufs.iter().map(|b| b.len() + BUF_WEIGHT).sum::<usize>()
        );
    }

    #[test]
    fn routed_connections_carry_peer_names() {
        let mut router_local = local("r", &[], 1000);
        router_local.router = true;
        let mut router = Connection::new(Role::Server, router_local.clone());
        let mut client = Connection::new(Role::Client, local("cli", &["f"], 1000));
        pump(&mut client, &mut router, 7);
        pump(&mut router, &mut client, 7);
        assert!(matches!(&events(&mut client)[..], [Event::Open(p)] if p.router));
        assert!(client.is_routed() && router.is_routed());
        events(&mut router);
        // Membership frames reach the client; a Request names its peer.
        router.queue_frame(Kind::Left, 0, 0, 0, "w1", Bytes::new());
        router.queue_frame(
            Kind::Request,
            4,
            2,
            0,
            "caller\0f",
            Bytes::from_static(b"a"),
        );
        pump(&mut router, &mut client, 5);
        let ev = events(&mut client);
        assert_eq!(ev[0], Event::Left("w1".into()));
        assert!(
            matches!(&ev[1], Event::Request { peer: Some(p), name, .. } if p == "caller" && name == "f")
        );
        // A routed request without a peer name is a protocol error.
        client.queue_frame(Kind::Request, 1, 2, 0, "f", Bytes::new());
        let mut bufs = Vec::new();
        client.poll_transmit(&mut bufs, 16);
        let mut t = router.recv_target();
        for b in &bufs {
            t.buf.extend_from_slice(b);
        }
        assert!(router.recv_done(t.buf).is_err());
        // A Router refuses a peer whose name could not be routed to.
        for bad in ["", "a\0b"] {
            let mut router = Connection::new(Role::Server, router_local.clone());
            let mut client = Connection::new(Role::Client, local(bad, &[], 1000));
            let mut bufs = Vec::new();
            client.poll_transmit(&mut bufs, 16);
            let mut t = router.recv_target();
            for b in &bufs {
                t.buf.extend_from_slice(b);
            }
            assert!(router.recv_done(t.buf).is_err(), "{bad:?}");
        }
        // A service's client refuses membership frames.
        let mut svc = Connection::new(Role::Server, local("svc", &[], 1000));
        let mut cli = Connection::new(Role::Client, local("c", &[], 1000));
        pump(&mut cli, &mut svc, 64);
        pump(&mut svc, &mut cli, 64);
        svc.queue_frame(Kind::Left, 0, 0, 0, "x", Bytes::new());
        let mut bufs = Vec::new();
        svc.poll_transmit(&mut bufs, 16);
        let mut t = cli.recv_target();
        for b in &bufs {
            t.buf.extend_from_slice(b);
        }
        assert!(cli.recv_done(t.buf).is_err());
    }

    #[test]
    fn frames_before_handshake_are_refused() {
        let mut server = Connection::new(Role::Server, local("svc", &[], 1000));
        let mut t = server.recv_target();
        t.buf
            .extend_from_slice(&encode_head(Kind::Request, 1, 0, 0, "f", 0));
        assert!(matches!(
            server.recv_done(t.buf),
            Err(DecodeError::Unexpected(Kind::Request, _))
        ));
    }
}
