//! What the fuzz targets in `fuzz/` run, and this crate's tests replay over their corpus.
//!
//! Everything here takes bytes a peer could send and checks what the rest of daffi relies on:
//! nothing a peer sends makes the protocol panic, receiving in pieces of any size gives the
//! same frames, a large payload is asked for exactly once and to its last byte, and a thread
//! scanning the stream itself (see [`crate::answer`]) reads a frame exactly as the connection
//! would. A broken rule panics: that is how a fuzzer hears of it.
//!
//! Each harness reads its first bytes as its settings (role, limits, how the stream is cut
//! into receives) and the rest as the peer's bytes.

use bytes::Bytes;

use crate::answer::{self, Answer, Scan, ScanRequest};
use crate::connection::{Connection, Event, Local, Role};
use crate::frame::{Kind, Payload};
use crate::handshake::{Hello, decode_names, decode_peers, encode_names, encode_peers};

/// Receive sizes, as a kernel might cut a stream: from a single byte to more than a frame.
struct Cuts(u64);

impl Cuts {
    fn new(seed: u8) -> Cuts {
        Cuts(0x9e37_79b9_7f4a_7c15 ^ u64::from(seed).wrapping_mul(0x2545_f491_4f6c_dd1d))
    }

    fn next(&mut self) -> usize {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        match self.0 % 8 {
            0 => 1,
            1 => 1 + (self.0 >> 8) as usize % 16,
            2..=4 => 1 + (self.0 >> 8) as usize % 512,
            _ => 1 + (self.0 >> 8) as usize % (96 * 1024),
        }
    }
}

/// The message limits a harness picks from: around the reader's small-payload size too.
const LIMITS: [u64; 4] = [
    1 << 10,
    crate::reader::SMALL_PAYLOAD as u64 + 1,
    1 << 20,
    crate::DEFAULT_MAX_MESSAGE_SIZE,
];

fn local(name: &str, router: bool, token: &[u8], limit: u64) -> Local {
    Local {
        name: name.to_owned(),
        functions: vec!["echo".to_owned(), "f".to_owned()],
        max_message_size: limit,
        token: token.to_vec(),
        router,
    }
}

/// Moves everything `from` has queued to send into `to`, as one receive; false when `to`
/// refused it.
fn pump(from: &mut Connection, to: &mut Connection) -> bool {
    let mut out = Vec::new();
    from.poll_transmit(&mut out, usize::MAX);
    let mut t = to.recv_target();
    for b in &out {
        t.buf.extend_from_slice(b);
    }
    to.recv_done(t.buf).is_ok()
}

/// A client and a server whose handshake is done: the client's view of a Router when
/// `router`.
fn open_pair(router: bool, limit: u64) -> (Connection, Connection) {
    let mut client = Connection::new(Role::Client, local("client", false, b"", limit));
    let mut server = Connection::new(Role::Server, local("server", router, b"", limit));
    assert!(pump(&mut client, &mut server), "the server refused a hello");
    assert!(
        pump(&mut server, &mut client),
        "the client refused a welcome"
    );
    for c in [&mut client, &mut server] {
        assert!(matches!(c.poll_event(), Some(Event::Open(_))));
        assert!(c.poll_event().is_none());
        assert!(c.is_open());
    }
    (client, server)
}

/// The receiving side of a connection, driven the way the runtime drives it: into the
/// staging buffer, or into a buffer of its own while a large payload comes.
struct Receiver {
    conn: Connection,
    /// The large payload being received.
    body: Option<Vec<u8>>,
    /// Large payloads received whole, by length (checked against the frames reporting them).
    bodies: Vec<usize>,
    events: Vec<Event>,
}

impl Receiver {
    fn new(conn: Connection) -> Receiver {
        Receiver {
            conn,
            body: None,
            bodies: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Feeds `stream` in pieces cut by `cuts`; stops at the first decode error (which closes
    /// a real connection) and returns whether there was one.
    fn feed(&mut self, mut stream: &[u8], cuts: &mut Cuts) -> bool {
        loop {
            if self.after_parse().is_err() {
                return true;
            }
            if stream.is_empty() {
                return false;
            }
            let step = cuts.next().min(stream.len());
            let got = if let Some(want) = self.conn.body_wanted() {
                let n = step.min(usize::try_from(want).unwrap_or(usize::MAX));
                let body = self.body.as_mut().expect("a body is wanted into a buffer");
                body.extend_from_slice(&stream[..n]);
                stream = &stream[n..];
                self.conn.body_received(n as u64)
            } else {
                let mut t = self.conn.recv_target();
                assert!(
                    t.max > 0,
                    "no room to receive into: the connection would stall"
                );
                let n = step.min(t.max);
                t.buf.extend_from_slice(&stream[..n]);
                stream = &stream[n..];
                self.conn.recv_done(t.buf)
            };
            if got.is_err() {
                return true;
            }
        }
    }

    /// What the runtime does after each parse: takes the events and gives a large payload
    /// that starts its buffer (see `after_parse` in the runtime's engine).
    fn after_parse(&mut self) -> Result<(), crate::DecodeError> {
        loop {
            while let Some(e) = self.conn.poll_event() {
                self.check(&e);
                self.events.push(e);
            }
            let Some(len) = self.conn.body_len() else {
                assert!(
                    self.conn.body_wanted().is_none(),
                    "bytes wanted for no payload"
                );
                return Ok(());
            };
            if self.body.is_some() {
                return Ok(());
            }
            let len = usize::try_from(len).expect("limits fit in memory");
            let mut body = Vec::with_capacity(len.min(1 << 20));
            body.extend_from_slice(self.conn.take_body_prefix());
            assert!(body.len() <= len, "the prefix overran its payload");
            self.body = Some(body);
            self.conn.body_received(0)?;
        }
    }

    /// Rules every event keeps.
    fn check(&mut self, e: &Event) {
        let payload = match e {
            Event::Request { payload, .. }
            | Event::Response { payload, .. }
            | Event::Error { payload, .. }
            | Event::Aborted { payload, .. } => payload,
            _ => return,
        };
        match payload {
            Payload::External(len) => {
                let body = self
                    .body
                    .take()
                    .expect("a large payload came without its buffer");
                assert_eq!(
                    body.len() as u64,
                    *len,
                    "a large payload came short or long"
                );
                self.bodies.push(body.len());
            }
            // A call's payload over the small size is received into a buffer of its own,
            // never staged (the errors made up locally are short messages).
            Payload::Inline(p) => assert!(
                p.len() <= crate::reader::SMALL_PAYLOAD,
                "a call's payload of {} bytes was staged",
                p.len()
            ),
        }
        if let Event::Request { call_id, flags, .. } = e {
            // Answering is what a server's or a client's runtime does next (a Router's routes
            // the request instead): it must not fail for the peer's sake.
            if !flags.no_reply() && self.conn.is_open() && !self.conn.local().router {
                let _ = self
                    .conn
                    .respond(*call_id, 0, 0, Bytes::from_static(b"answer"));
            }
        }
        let mut out = Vec::new();
        while self.conn.poll_transmit(&mut out, 64) > 0 {}
        while self.conn.take_spliced().is_some() {}
    }
}

/// A `Connection` receiving arbitrary bytes: as a client, a server or a Router (byte 0), with
/// a message limit and a shared secret (byte 1), in receives cut from byte 2's seed; and, once
/// the first run ends, the same bytes cut differently must give the same events.
pub fn connection(data: &[u8]) {
    let [role, limits, seed, stream @ ..] = data else {
        return;
    };
    let limit = LIMITS[usize::from(limits & 3)];
    let token: &[u8] = if limits & 4 != 0 { b"secret" } else { b"" };
    let make = || match role % 3 {
        0 => Connection::new(Role::Client, local("client", false, token, limit)),
        1 => Connection::new(Role::Server, local("server", false, token, limit)),
        _ => Connection::new(Role::Server, local("router", true, token, limit)),
    };
    let mut first = Receiver::new(make());
    let failed = first.feed(stream, &mut Cuts::new(*seed));
    let mut again = Receiver::new(make());
    let failed_again = again.feed(stream, &mut Cuts::new(seed.wrapping_add(101)));
    assert_eq!(
        failed, failed_again,
        "cutting the stream differently changed its fate"
    );
    if !failed {
        assert_eq!(
            first.events, again.events,
            "cut differently, the stream read differently"
        );
        assert_eq!(first.bodies, again.bodies);
    }
}

/// A Router: three connections in the Router's role, each fed its own arbitrary stream, and
/// the routing table fed their events as the runtime feeds it. Byte 0 cuts the receives; then
/// records `[connection, length (u16 LE), bytes]`. Besides never panicking, the table must
/// send only to connections that joined and are still there, never hand a request back to its
/// sender, return each answer to the caller of the call it answers under that caller's own id,
/// and be empty once everyone left.
pub fn router(data: &[u8]) {
    const CONNS: u8 = 3;
    let [seed, records @ ..] = data else {
        return;
    };
    let mut records: &[u8] = records;
    let mut cuts = Cuts::new(*seed);
    let mut conns: Vec<Receiver> = (0..CONNS)
        .map(|_| {
            Receiver::new(Connection::new(
                Role::Server,
                local("router", true, b"", LIMITS[2]),
            ))
        })
        .collect();
    let mut sim = RouterSim::new();
    while let [conn, lo, hi, rest @ ..] = records {
        let id = conn % CONNS;
        let n = usize::from(u16::from_le_bytes([*lo, *hi])).min(rest.len());
        let (bytes, next) = rest.split_at(n);
        records = next;
        if sim.dead.contains(&id) {
            continue;
        }
        let r = &mut conns[usize::from(id)];
        let before = r.events.len();
        let failed = r.feed(bytes, &mut cuts);
        for e in r.events.drain(before..).collect::<Vec<_>>() {
            sim.event(id, e);
        }
        if failed {
            // The runtime closes the connection: its calls fail, the others hear it left.
            sim.leave(id);
        }
    }
    for id in 0..CONNS {
        if sim.live.contains(&id) {
            sim.leave(id);
        }
    }
    let left = sim.table.names();
    assert!(left.is_empty(), "members left behind: {left:?}");
}

/// A Router's routing table, fed as the runtime feeds it, and what the harness knows of it.
struct RouterSim {
    table: crate::router::RoutingTable<u8>,
    /// Connections that joined and are still there.
    live: std::collections::HashSet<u8>,
    /// Connections closed or evicted.
    dead: std::collections::HashSet<u8>,
    /// Calls forwarded and not answered: (callee, id there) → (caller, caller's id).
    forwarded: std::collections::HashMap<(u8, u64), (u8, u64)>,
    out: Vec<crate::router::Action<u8>>,
}

/// What an event asked of the table: `(from, kind, call id, the call is known)`.
type Asked = Option<(u8, Kind, u64, bool)>;

impl RouterSim {
    fn new() -> RouterSim {
        RouterSim {
            table: crate::router::RoutingTable::new("router"),
            live: Default::default(),
            dead: Default::default(),
            forwarded: Default::default(),
            out: Vec::new(),
        }
    }

    fn event(&mut self, id: u8, e: Event) {
        let (kind, call_id, serde, flags, meta, payload) = match e {
            Event::Open(peer) => {
                self.live.insert(id);
                self.table.join(id, peer, &mut self.out);
                return self.apply(None);
            }
            Event::Announce(names) => {
                self.table.announce(id, &names, &mut self.out);
                return self.apply(None);
            }
            Event::Request {
                call_id,
                peer,
                name,
                serde,
                flags,
                payload,
            } => {
                let payload = Bytes::from(vec![0; payload_len(&payload)]);
                let target = peer.unwrap_or_default();
                let out = &mut self.out;
                self.table
                    .request(id, call_id, &target, &name, serde, flags, payload, out);
                return self.apply(Some((id, Kind::Request, call_id, true)));
            }
            Event::Response {
                call_id,
                serde,
                flags,
                payload,
            } => (
                Kind::Response,
                call_id,
                serde,
                flags,
                String::new(),
                payload,
            ),
            Event::Error {
                call_id,
                code,
                payload,
            } => (Kind::Error, call_id, 0, crate::Flags(0), code, payload),
            _ => return,
        };
        let payload = Bytes::from(vec![0; payload_len(&payload)]);
        let known = self.forwarded.contains_key(&(id, call_id));
        let out = &mut self.out;
        self.table
            .answer(id, kind, call_id, serde, flags, meta, payload, out);
        self.apply(Some((id, kind, call_id, known)));
    }

    /// Connection `id` closed: the table forgets it.
    fn leave(&mut self, id: u8) {
        self.live.remove(&id);
        self.dead.insert(id);
        self.closed(vec![id]);
    }

    /// The connections `evicted` are closed, as the runtime closes them (the table let them go
    /// when it evicted them).
    fn closed(&mut self, evicted: Vec<u8>) {
        for id in evicted {
            self.table.leave(id, &mut self.out);
            self.apply(None);
            self.forwarded.retain(|(callee, _), _| *callee != id);
        }
    }

    /// Carries out the table's actions, checking each against what `asked` for them.
    fn apply(&mut self, asked: Asked) {
        use crate::router::Action;
        let mut answered = false;
        let mut evicted = Vec::new();
        for a in std::mem::take(&mut self.out) {
            let Action::Send {
                to, kind, call_id, ..
            } = a
            else {
                if let Action::Evict { conn, .. } = a {
                    // Gone at once: nothing may be sent to it after this.
                    self.live.remove(&conn);
                    self.dead.insert(conn);
                    evicted.push(conn);
                }
                continue;
            };
            assert!(
                self.live.contains(&to),
                "sent to connection {to}, which is not there"
            );
            match asked {
                // A request from `caller` under `id`: forwarded under a new id, or refused to
                // the caller itself, under its own id.
                Some((caller, Kind::Request, id, _)) if kind == Kind::Request => {
                    assert_ne!(to, caller, "a request handed back to its sender");
                    if call_id != 0 {
                        let first = self.forwarded.insert((to, call_id), (caller, id));
                        assert!(first.is_none(), "two calls forwarded under one id");
                    }
                }
                Some((caller, Kind::Request, id, _)) if kind == Kind::Error => {
                    assert_eq!((to, call_id), (caller, id), "a refusal went astray");
                }
                // An answer to call `id` of `callee`: to that call's caller, under its own id
                // (the answer itself, or an error saying why not); nothing at all for an
                // answer to no call forwarded there.
                Some((callee, Kind::Response | Kind::Error, id, known)) => {
                    assert!(known && !answered, "an answer to no call went on");
                    let caller = self.forwarded.remove(&(callee, id));
                    assert_eq!(Some((to, call_id)), caller, "an answer went astray");
                    answered = true;
                }
                _ => {}
            }
        }
        self.closed(evicted);
    }
}

fn payload_len(p: &Payload) -> usize {
    match p {
        Payload::Inline(v) => v.len(),
        Payload::External(n) => usize::try_from(*n).expect("limits fit in memory"),
    }
}

/// The scanners a thread uses ([`answer::scan`], [`answer::scan_request`]) against the
/// connection's own parser: whatever a scanner takes from the front of the stream, an open
/// connection reads the same way. Byte 0 picks the limit and whether the connection is a
/// Router's client.
pub fn scanners(data: &[u8]) {
    let [settings, buf @ ..] = data else {
        return;
    };
    let limit = LIMITS[usize::from(settings & 3)];
    let routed = settings & 4 != 0;
    match answer::scan(buf, limit) {
        Scan::Answer {
            call_id,
            len,
            answer,
        } => {
            assert!(len <= buf.len(), "an answer longer than the bytes scanned");
            let want = match answer {
                Answer::Result {
                    serde,
                    flags,
                    payload,
                } => Event::Response {
                    call_id,
                    serde,
                    flags,
                    payload: Payload::Inline(payload.to_vec()),
                },
                Answer::Error { code, payload } => Event::Error {
                    call_id,
                    code: code.to_owned(),
                    payload: Payload::Inline(payload.to_vec()),
                },
            };
            let (mut client, _) = open_pair(routed, limit);
            assert_eq!(read_front(&mut client, &buf[..len]), vec![want]);
        }
        Scan::Large(head) => {
            assert!(
                head.head_len <= buf.len(),
                "a head longer than the bytes scanned"
            );
            assert!(head.payload_len <= limit && head.payload_len > 0);
            let (mut client, _) = open_pair(routed, limit);
            assert!(read_front(&mut client, &buf[..head.head_len]).is_empty());
            assert_eq!(client.body_len(), Some(head.payload_len));
            assert_eq!(
                client.body_head().map(|(h, _)| h.call_id),
                Some(head.call_id)
            );
        }
        Scan::Partial | Scan::Other => {}
    }
    match answer::scan_request(buf, limit, routed) {
        ScanRequest::Request(r) => {
            assert!(
                r.len <= buf.len(),
                "a request longer than the bytes scanned"
            );
            let (mut client, mut server) = open_pair(routed, limit);
            // A Router's client gets requests named `caller\0function`; a server, bare names.
            let conn = if routed { &mut client } else { &mut server };
            match read_front(conn, &buf[..r.len]).as_slice() {
                [
                    Event::Request {
                        call_id,
                        name,
                        serde,
                        flags,
                        payload: Payload::Inline(payload),
                        ..
                    },
                ] => {
                    assert_eq!(
                        (*call_id, name.as_str(), *serde, *flags, payload.as_slice()),
                        (r.call_id, r.name, r.serde, r.flags, r.payload)
                    );
                }
                other => panic!("scanned a request, the connection read {other:?}"),
            }
        }
        ScanRequest::Large(head) => {
            assert!(
                head.head_len <= buf.len(),
                "a head longer than the bytes scanned"
            );
            let (mut client, mut server) = open_pair(routed, limit);
            let conn = if routed { &mut client } else { &mut server };
            assert!(read_front(conn, &buf[..head.head_len]).is_empty());
            assert_eq!(conn.body_len(), Some(head.payload_len));
        }
        ScanRequest::Partial | ScanRequest::Other => {}
    }
}

/// The events an open connection reads from `bytes`, received at once; it must accept them.
fn read_front(conn: &mut Connection, bytes: &[u8]) -> Vec<Event> {
    let mut t = conn.recv_target();
    t.buf.extend_from_slice(bytes);
    if let Err(e) = conn.recv_done(t.buf) {
        panic!("a scanner took bytes the connection refuses: {e}");
    }
    std::iter::from_fn(|| conn.poll_event()).collect()
}

/// The handshake's payload decoders: they refuse or decode, and what they decode encodes back
/// to something that decodes the same. Byte 0 picks the decoder.
pub fn handshake(data: &[u8]) {
    let [which, b @ ..] = data else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(h) = Hello::decode(b) {
                assert_eq!(Hello::decode(&h.encode()), Ok(h));
            }
        }
        1 => {
            if let Ok(names) = decode_names(b) {
                assert_eq!(decode_names(&encode_names(&names)), Ok(names));
            }
        }
        _ => {
            if let Ok(peers) = decode_peers(b) {
                assert_eq!(decode_peers(&encode_peers(&peers)), Ok(peers));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_head;

    fn frame(kind: Kind, id: u64, meta: &str, payload: &[u8]) -> Vec<u8> {
        let mut v = encode_head(kind, id, 2, 0, meta, payload.len() as u64).to_vec();
        v.extend_from_slice(payload);
        v
    }

    /// Every file of `fuzz/corpus/<target>` (inputs the fuzzer kept) and
    /// `fuzz/regressions/<target>` (inputs that once broke a rule), through `run`.
    fn replay(target: &str, run: fn(&[u8])) -> usize {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
        let mut n = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
                continue;
            };
            for e in entries {
                let path = e.expect("a readable directory").path();
                let data = std::fs::read(&path).expect("a readable input");
                let outcome = std::panic::catch_unwind(|| run(&data));
                assert!(outcome.is_ok(), "{} broke a rule", path.display());
                n += 1;
            }
        }
        n
    }

    #[test]
    fn the_fuzz_corpora_keep_every_rule() {
        for (target, run) in [
            ("connection", connection as fn(&[u8])),
            ("scanners", scanners),
            ("handshake", handshake),
            ("router", router),
        ] {
            assert!(
                replay(target, run) > 0,
                "no corpus for {target} under fuzz/"
            );
        }
    }

    #[test]
    fn the_harnesses_pass_real_traffic() {
        // What a client receives: a welcome, then answers small and large, and an error.
        let mut client = Connection::new(Role::Client, local("client", false, b"", 1 << 20));
        let mut server = Connection::new(Role::Server, local("server", false, b"", 1 << 20));
        assert!(pump(&mut client, &mut server));
        let mut out = Vec::new();
        server.poll_transmit(&mut out, usize::MAX);
        let mut data = vec![0, 2, 9];
        out.iter().for_each(|b| data.extend_from_slice(b));
        data.extend(frame(Kind::Response, 1, "", b"small"));
        data.extend(frame(Kind::Response, 2, "", &[7; 100_000]));
        data.extend(frame(Kind::Error, 3, "remote", b"{}"));
        let mut receiver = Receiver::new(Connection::new(
            Role::Client,
            local("client", false, b"", 1 << 20),
        ));
        assert!(!receiver.feed(&data[3..], &mut Cuts::new(9)));
        assert_eq!(receiver.events.len(), 4, "{:?}", receiver.events);
        assert_eq!(receiver.bodies, [100_000]);
        connection(&data);
        for settings in 0..8u8 {
            let mut d = vec![settings];
            d.extend(frame(Kind::Response, 5, "", b"x"));
            scanners(&d);
            let meta = if settings & 4 != 0 {
                "caller\0echo"
            } else {
                "echo"
            };
            let mut d = vec![settings];
            d.extend(frame(Kind::Request, 6, meta, &[1; 20_000]));
            scanners(&d);
        }
        handshake(&[0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }
}
