//! Callers and Service workers receiving on their own threads (see the runtime's `direct`
//! module). One test in its own binary, its scenarios one after the other: whether a caller
//! reads its own socket depends on how many threads of the process wait at once, so tests
//! running alongside would change what these observe.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use daffi_runtime::{
    Address, CallError, Client, ClientConfig, DEFAULT_MAX_MESSAGE_SIZE, Engine, Listening, Next,
    Node, Router, RouterConfig, Server, ServerConfig,
};

mod support;

use support::{backends, client, serve};

#[test]
fn callers_and_workers_receive_on_their_own_threads() {
    for engine in backends() {
        sequential_callers_receive_their_own_answers(&engine);
        late_answers_read_by_a_caller_are_dropped(&engine);
        service_workers_receive_their_own_requests(&engine);
        a_worker_recalled_midway_through_a_large_request_loses_nothing(&engine);
        routed_workers_receive_their_own_requests(&engine);
    }
}

/// A client speaking the wire protocol by hand, to send a frame in parts.
struct RawClient(std::net::TcpStream);

impl RawClient {
    fn connect(address: &Address, name: &str) -> RawClient {
        use daffi_proto::frame::{Kind, encode_head};
        use std::io::Write;
        let Address::Tcp { port, .. } = address else {
            unreachable!("a TCP server")
        };
        let mut s = std::net::TcpStream::connect(("127.0.0.1", *port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let hello = daffi_proto::Hello {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            functions: Vec::new(),
            token: Vec::new(),
        }
        .encode();
        s.write_all(&encode_head(Kind::Hello, 0, 0, 0, name, hello.len() as u64))
            .unwrap();
        s.write_all(&hello).unwrap();
        let mut c = RawClient(s);
        assert_eq!(c.frame().0.kind, Kind::Welcome);
        c
    }

    /// Reads one whole frame: header, meta, payload.
    fn frame(&mut self) -> (daffi_proto::Header, Vec<u8>) {
        use std::io::Read;
        let mut h = [0u8; daffi_proto::HEADER_LEN];
        self.0.read_exact(&mut h).unwrap();
        let h = daffi_proto::Header::decode(&h).unwrap();
        let mut rest = vec![0; (u64::from(h.meta_len) + h.payload_len) as usize];
        self.0.read_exact(&mut rest).unwrap();
        rest.drain(..h.meta_len as usize);
        (h, rest)
    }

    fn write(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.0.write_all(bytes).unwrap();
    }

    /// Sends the head of an `echo` request with a payload of `len` bytes (none of them yet).
    fn request_head(&mut self, call_id: u64, len: usize) {
        use daffi_proto::frame::{Kind, encode_head};
        self.write(&encode_head(
            Kind::Request,
            call_id,
            0,
            0,
            "echo",
            len as u64,
        ));
    }

    /// The answer to `call_id` (skipping any other frame).
    fn answer(&mut self, call_id: u64) -> Vec<u8> {
        loop {
            let (h, payload) = self.frame();
            if h.call_id == call_id && h.kind == daffi_proto::Kind::Response {
                return payload;
            }
        }
    }
}

/// A worker receiving a large request itself, told to give the connection back midway (a
/// second client connects): the engine receives the rest into the same buffer, and the call
/// runs with its payload whole, in order with what the client sends after it.
fn a_worker_recalled_midway_through_a_large_request_loses_nothing(engine: &Engine) {
    let server = serve(
        engine,
        Address::Tcp {
            host: "127.0.0.1".into(),
            port: 0,
        },
    );
    let mut raw = RawClient::connect(server.address(), "raw");
    // Small requests until the worker reads them itself.
    let mut id = 0u64;
    while server.requests_read_by_workers() < 20 && id < 5000 {
        id += 1;
        raw.request_head(id, 8);
        raw.write(&id.to_le_bytes());
        assert_eq!(raw.answer(id), id.to_le_bytes());
    }
    assert!(
        server.requests_read_by_workers() >= 20,
        "{}: the worker never read its requests",
        engine.backend()
    );
    let len = 8 << 20;
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    raw.request_head(1000, len);
    raw.write(&data[..2 << 20]);
    std::thread::sleep(Duration::from_millis(100));
    let second = client(engine, server.address().clone(), "second");
    let r = second
        .call(None, "echo", 0, 0, Bytes::from_static(b"meanwhile"), None)
        .unwrap();
    assert_eq!(r.payload.as_slice(), b"meanwhile");
    raw.write(&data[2 << 20..]);
    raw.request_head(1001, 5);
    raw.write(b"after");
    assert!(
        raw.answer(1000) == data,
        "{}: the large request arrived damaged",
        engine.backend()
    );
    assert_eq!(raw.answer(1001), b"after");
    second.close();
    server.stop();
}

/// A client whose calls come one at a time receives their answers on the calling thread
/// (the engine parks the connection). Everything else still works around it: a large answer
/// and a remote error in between, several threads calling at once, a timed-out call whose late
/// answer must not be taken for the next one's, and a server that goes away while nobody calls.
fn sequential_callers_receive_their_own_answers(engine: &Engine) {
    {
        let server = serve(
            engine,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 0,
            },
        );
        let c = Arc::new(client(engine, server.address().clone(), "seq"));
        let echo = |c: &Client, msg: Vec<u8>| {
            let r = c
                .call(None, "echo", 0, 0, Bytes::from(msg.clone()), None)
                .unwrap();
            assert!(
                r.payload.as_slice() == msg,
                "{}: wrong answer",
                engine.backend()
            );
        };
        // Most answers are read by the caller; under load (a connection parked and unused for
        // 2 ms goes back to the engine) fewer, so call until 200 were, within a bound.
        let mut made = 0u32;
        while c.answers_read_by_callers() < 200 && made < 5000 {
            echo(&c, made.to_le_bytes().to_vec());
            made += 1;
        }
        let direct = c.answers_read_by_callers();
        assert!(
            direct >= 200,
            "{}: only {direct} of {made} answers read by the caller",
            engine.backend()
        );
        // Answers just over the small size, and much larger, each after small ones.
        for size in [16 << 10 | 1, 70 << 10, 200 << 10, 1 << 20] {
            for i in 0..5u32 {
                echo(&c, i.to_le_bytes().to_vec());
            }
            echo(&c, (0..size).map(|i| (i % 251) as u8).collect());
        }
        echo(&c, vec![7u8; 3 << 20]);
        // A large answer is received by its caller too, straight into a buffer of its own:
        // call until 20 were.
        let before = c.answers_read_by_callers();
        let big: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
        let mut made = 0u32;
        while c.answers_read_by_callers() < before + 20 && made < 1000 {
            echo(&c, big.clone());
            made += 1;
        }
        assert!(
            c.answers_read_by_callers() >= before + 20,
            "{}: callers read only {} of {made} large answers",
            engine.backend(),
            c.answers_read_by_callers() - before
        );
        assert_eq!(
            c.call(None, "fail", 2, 0, Bytes::new(), None),
            Err(CallError::Remote(b"boom".to_vec()))
        );
        for i in 0..50u32 {
            echo(&c, i.to_le_bytes().to_vec());
        }
        assert!(c.answers_read_by_callers() > direct);
        // Four threads at once, each with its own payloads.
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..200u32 {
                        let mut msg = vec![t];
                        msg.extend_from_slice(&i.to_le_bytes());
                        let r = c
                            .call(None, "echo", 0, 0, Bytes::from(msg.clone()), None)
                            .unwrap();
                        assert!(r.payload.as_slice() == msg);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        echo(&c, b"alone again".to_vec());
        server.stop();
        // Nobody calls: the engine takes the parked connection back and sees the end.
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.is_open() {
            assert!(
                Instant::now() < deadline,
                "{}: the closed server went unnoticed",
                engine.backend()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(matches!(
            c.call(None, "echo", 0, 0, Bytes::from_static(b"x"), None),
            Err(CallError::Disconnected(_))
        ));
    }
}

/// A call that timed out while its caller was reading: the late answer is dropped, never
/// given to the next call.
fn late_answers_read_by_a_caller_are_dropped(engine: &Engine) {
    {
        let server = Arc::new(
            Server::start(
                engine,
                ServerConfig {
                    name: "lazy".into(),
                    address: Address::Tcp {
                        host: "127.0.0.1".into(),
                        port: 0,
                    },
                    max_message_size: 1 << 20,
                    functions: vec!["f".into()],
                    token: Vec::new(),
                    serde_formats: None,
                },
            )
            .unwrap(),
        );
        let s = server.clone();
        let answering = std::thread::spawn(move || {
            while let Next::Item(call) = s.next_call(None) {
                if call.payload.as_slice() == b"slow" {
                    std::thread::sleep(Duration::from_millis(300));
                }
                s.respond(call.conn, call.call_id, 0, 0, call.payload.into_bytes());
            }
        });
        let c = client(engine, server.address().clone(), "impatient");
        for _ in 0..20 {
            let r = c
                .call(None, "f", 0, 0, Bytes::from_static(b"quick"), None)
                .unwrap();
            assert_eq!(r.payload.as_slice(), b"quick");
        }
        let e = c.call(
            None,
            "f",
            0,
            0,
            Bytes::from_static(b"slow"),
            Some(Duration::from_millis(50)),
        );
        assert_eq!(e, Err(CallError::Timeout));
        for _ in 0..20 {
            let r = c
                .call(None, "f", 0, 0, Bytes::from_static(b"next"), None)
                .unwrap();
            assert_eq!(
                r.payload.as_slice(),
                b"next",
                "{}: a late answer leaked",
                engine.backend()
            );
        }
        server.stop();
        answering.join().unwrap();
    }
}

/// A Service with one connection lends it to its idle worker, which receives the next request
/// itself. Around it: a large request and an unknown function (left to the engine), pipelined
/// no-reply calls run in order, several worker threads and caller threads at once, a second
/// client connecting meanwhile, and a client that leaves while a worker waits on its socket.
fn service_workers_receive_their_own_requests(engine: &Engine) {
    {
        let server = Arc::new(
            Server::start(
                engine,
                ServerConfig {
                    name: "svc".into(),
                    address: Address::Tcp {
                        host: "127.0.0.1".into(),
                        port: 0,
                    },
                    max_message_size: 64 << 20,
                    functions: vec!["echo".into(), "note".into()],
                    token: Vec::new(),
                    serde_formats: None,
                },
            )
            .unwrap(),
        );
        let notes = Arc::new(Mutex::new(Vec::new()));
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let (s, notes) = (server.clone(), notes.clone());
                std::thread::spawn(move || {
                    while let Next::Item(call) = s.next_call(None) {
                        if call.name == "note" {
                            notes.lock().unwrap().push(call.payload.as_slice().to_vec());
                        }
                        if !call.flags.no_reply() {
                            s.respond(
                                call.conn,
                                call.call_id,
                                call.serde,
                                call.flags.0,
                                call.payload.into_bytes(),
                            );
                        }
                    }
                })
            })
            .collect();
        let c = Arc::new(client(engine, server.address().clone(), "one"));
        let echo = |c: &Client, msg: Vec<u8>| {
            let r = c
                .call(None, "echo", 0, 0, Bytes::from(msg.clone()), None)
                .unwrap();
            assert!(
                r.payload.as_slice() == msg,
                "{}: wrong answer",
                engine.backend()
            );
        };
        // As for callers: most requests are read by the workers; call until 200 were.
        let mut made = 0u32;
        while server.requests_read_by_workers() < 200 && made < 5000 {
            echo(&c, made.to_le_bytes().to_vec());
            made += 1;
        }
        let read = server.requests_read_by_workers();
        assert!(
            read >= 200,
            "{}: workers read only {read} of {made} requests",
            engine.backend()
        );
        echo(&c, vec![9u8; 3 << 20]);
        for size in [16 << 10 | 1, 70 << 10, 200 << 10, 1 << 20] {
            for i in 0..5u32 {
                echo(&c, i.to_le_bytes().to_vec());
            }
            echo(&c, (0..size).map(|i| (i % 249) as u8).collect());
        }
        // Workers receive large requests themselves too: call until 20 were.
        let before = server.requests_read_by_workers();
        let big: Vec<u8> = (0..1 << 20).map(|i| (i % 247) as u8).collect();
        let mut made = 0u32;
        while server.requests_read_by_workers() < before + 20 && made < 1000 {
            echo(&c, big.clone());
            made += 1;
        }
        assert!(
            server.requests_read_by_workers() >= before + 20,
            "{}: workers read only {} of {made} large requests",
            engine.backend(),
            server.requests_read_by_workers() - before
        );
        assert!(matches!(
            c.call(None, "nope", 0, 0, Bytes::new(), None),
            Err(CallError::Transmission(_))
        ));
        // Pipelined no-reply calls, then a call: with one worker at a time on this connection's
        // frames they are all there, in the order sent.
        for i in 0..100u32 {
            c.send(None, "note", 0, 0, Bytes::from(i.to_le_bytes().to_vec()))
                .unwrap();
        }
        echo(&c, b"after the notes".to_vec());
        let deadline = Instant::now() + Duration::from_secs(5);
        while notes.lock().unwrap().len() < 100 {
            assert!(Instant::now() < deadline, "notes lost");
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut got: Vec<u32> = notes
            .lock()
            .unwrap()
            .iter()
            .map(|n| u32::from_le_bytes(n[..4].try_into().unwrap()))
            .collect();
        got.sort_unstable();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        // Four caller threads at once, three workers.
        let callers: Vec<_> = (0..4u8)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..200u32 {
                        let mut msg = vec![t];
                        msg.extend_from_slice(&i.to_le_bytes());
                        let r = c
                            .call(None, "echo", 0, 0, Bytes::from(msg.clone()), None)
                            .unwrap();
                        assert!(r.payload.as_slice() == msg);
                    }
                })
            })
            .collect();
        for t in callers {
            t.join().unwrap();
        }
        // A second client while the connection is lent: both are served.
        let c2 = client(engine, server.address().clone(), "two");
        for i in 0..50u32 {
            echo(&c2, i.to_le_bytes().to_vec());
            echo(&c, i.to_le_bytes().to_vec());
        }
        c2.close();
        for i in 0..50u32 {
            echo(&c, i.to_le_bytes().to_vec());
        }
        // The last client leaves while a worker waits on its socket: the Service sees it go.
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.members().len() != 1 {
            assert!(Instant::now() < deadline, "the second client never left");
            std::thread::sleep(Duration::from_millis(2));
        }
        c.close();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !server.members().is_empty() {
            assert!(
                Instant::now() < deadline,
                "{}: a leaving client went unnoticed",
                engine.backend()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        server.stop();
        for w in workers {
            w.join().unwrap();
        }
    }
}

/// Through a Router, a worker Client's idle workers read their requests themselves too, while
/// everything else on that connection still reaches the engine: the worker's own calls and
/// their answers, membership frames, large payloads, requests the Router refuses, no-reply
/// calls in order, several callers at once, and the Router going away.
fn routed_workers_receive_their_own_requests(engine: &Engine) {
    let router = Router::start(
        engine,
        RouterConfig {
            name: "router".into(),
            address: Address::Tcp {
                host: "127.0.0.1".into(),
                port: 0,
            },
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            token: Vec::new(),
        },
    )
    .unwrap();
    let join = |name: &str, functions: &[&str]| {
        Arc::new(
            Client::connect(
                engine,
                ClientConfig {
                    name: name.into(),
                    address: router.address().clone(),
                    max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
                    functions: functions.iter().map(|f| f.to_string()).collect(),
                    connect_timeout: Duration::from_secs(5),
                    token: Vec::new(),
                },
            )
            .unwrap(),
        )
    };
    // `helper` answers `twice` with its payload doubled; `w`'s `relay` asks `helper` for that
    // (an answer arriving on w's connection while its workers read it).
    let helper = join("helper", &["twice"]);
    let worker = join("w", &["echo", "note", "relay"]);
    let notes = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    {
        let h = helper.clone();
        threads.push(std::thread::spawn(move || {
            while let Next::Item(call) = h.next_call(None) {
                let mut out = call.payload.as_slice().to_vec();
                out.extend_from_within(..);
                h.respond(call.conn, call.call_id, call.serde, 0, Bytes::from(out));
            }
        }));
    }
    for _ in 0..2 {
        let (w, notes) = (worker.clone(), notes.clone());
        threads.push(std::thread::spawn(move || {
            while let Next::Item(call) = w.next_call(None) {
                let out = match call.name.as_str() {
                    "note" => {
                        notes.lock().unwrap().push(call.payload.as_slice().to_vec());
                        continue;
                    }
                    "relay" => match w.call(
                        Some("helper"),
                        "twice",
                        0,
                        0,
                        call.payload.into_bytes(),
                        Some(Duration::from_secs(5)),
                    ) {
                        Ok(r) => r.payload.into_bytes(),
                        Err(e) => Bytes::from(format!("relay failed: {e}")),
                    },
                    _ => call.payload.into_bytes(),
                };
                w.respond(call.conn, call.call_id, call.serde, 0, out);
            }
        }));
    }
    let caller = join("caller", &[]);
    caller
        .wait_for_members(
            &["w".to_owned(), "helper".to_owned()],
            Some(Duration::from_secs(5)),
        )
        .unwrap();
    let call = |c: &Client, name: &str, msg: Vec<u8>| {
        c.call(
            Some("w"),
            name,
            0,
            0,
            Bytes::from(msg),
            Some(Duration::from_secs(10)),
        )
        .unwrap()
        .payload
        .as_slice()
        .to_vec()
    };
    let mut made = 0u32;
    while worker.requests_read_by_workers() < 200 && made < 5000 {
        let msg = made.to_le_bytes().to_vec();
        assert_eq!(
            call(&caller, "echo", msg.clone()),
            msg,
            "{}",
            engine.backend()
        );
        made += 1;
    }
    let read = worker.requests_read_by_workers();
    assert!(
        read >= 200,
        "{}: the worker's threads read only {read} of {made} requests",
        engine.backend()
    );
    // Its own calls, answered on the connection its workers read.
    for i in 0..50u32 {
        let msg = i.to_le_bytes().to_vec();
        assert_eq!(
            call(&caller, "relay", msg.clone()),
            [&msg[..], &msg[..]].concat()
        );
        assert_eq!(call(&caller, "echo", msg.clone()), msg);
    }
    // Large payloads in between small ones. The Router passes them on while they arrive
    // (with a status byte after them), and the worker's threads receive them too.
    for size in [16 << 10 | 1, 300 << 10, 3 << 20] {
        let big: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        assert_eq!(call(&caller, "echo", big.clone()), big);
        assert_eq!(call(&caller, "echo", b"small".to_vec()), b"small");
    }
    let big: Vec<u8> = (0..1 << 20).map(|i| (i % 241) as u8).collect();
    let before = worker.requests_read_by_workers();
    let mut made = 0u32;
    while worker.requests_read_by_workers() < before + 20 && made < 1000 {
        assert_eq!(call(&caller, "echo", big.clone()), big);
        made += 1;
    }
    assert!(
        worker.requests_read_by_workers() >= before + 20,
        "{}: the worker's threads read only {} of {made} large requests",
        engine.backend(),
        worker.requests_read_by_workers() - before
    );
    // A function the worker does not export: refused, and the worker goes on.
    assert!(matches!(
        caller.call(
            Some("w"),
            "nope",
            0,
            0,
            Bytes::new(),
            Some(Duration::from_secs(5))
        ),
        Err(CallError::Transmission(_))
    ));
    // No-reply calls, then a call: all there, none lost.
    for i in 0..100u32 {
        caller
            .send(
                Some("w"),
                "note",
                0,
                0,
                Bytes::from(i.to_le_bytes().to_vec()),
            )
            .unwrap();
    }
    assert_eq!(call(&caller, "echo", b"after".to_vec()), b"after");
    let deadline = Instant::now() + Duration::from_secs(5);
    while notes.lock().unwrap().len() < 100 {
        assert!(
            Instant::now() < deadline,
            "{}: notes lost",
            engine.backend()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut got: Vec<u32> = notes
        .lock()
        .unwrap()
        .iter()
        .map(|n| u32::from_le_bytes(n[..4].try_into().unwrap()))
        .collect();
    got.sort_unstable();
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    // Several callers at once, and a peer joining (a membership frame) meanwhile.
    let callers: Vec<_> = (0..3u8)
        .map(|t| {
            let c = join(&format!("c{t}"), &[]);
            std::thread::spawn(move || {
                c.wait_for_members(&["w".to_owned()], Some(Duration::from_secs(5)))
                    .unwrap();
                for i in 0..200u32 {
                    let mut msg = vec![t];
                    msg.extend_from_slice(&i.to_le_bytes());
                    let r = c
                        .call(Some("w"), "echo", 0, 0, Bytes::from(msg.clone()), None)
                        .unwrap();
                    assert!(r.payload.as_slice() == msg);
                }
                c.close();
            })
        })
        .collect();
    for t in callers {
        t.join().unwrap();
    }
    assert_eq!(call(&caller, "echo", b"last".to_vec()), b"last");
    // The Router goes away while the worker's threads wait on its socket: they see it end.
    router.stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    while worker.is_open() {
        assert!(
            Instant::now() < deadline,
            "{}: the worker never saw the Router go",
            engine.backend()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    for c in [&worker, &helper, &caller] {
        c.close();
    }
    for t in threads {
        t.join().unwrap();
    }
}
