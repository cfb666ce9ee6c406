//! End-to-end through a Router on loopback, on every backend: routing, round-robin, large
//! payloads, membership, eviction and failures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use daffi_runtime::{
    Address, Backend, CallError, CatchUp, Client, ClientConfig, DEFAULT_MAX_MESSAGE_SIZE, Engine,
    Listening, MemberEvent, Next, Node, Router, RouterConfig,
};

fn backends() -> Vec<Engine> {
    let mut v = vec![Engine::get(Backend::Poll).unwrap()];
    match Engine::get(Backend::Uring) {
        Ok(e) => v.push(e),
        Err(e) => eprintln!("io_uring unavailable here, testing poll only: {e}"),
    }
    v
}

fn router(engine: &Engine, address: Address) -> Router {
    Router::start(
        engine,
        RouterConfig {
            name: "router".into(),
            address,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            token: Vec::new(),
        },
    )
    .unwrap()
}

fn client(engine: &Engine, address: &Address, name: &str, functions: &[&str]) -> Arc<Client> {
    Arc::new(
        Client::connect(
            engine,
            ClientConfig {
                name: name.into(),
                address: address.clone(),
                max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
                functions: functions.iter().map(|s| s.to_string()).collect(),
                connect_timeout: Duration::from_secs(5),
                token: Vec::new(),
            },
        )
        .unwrap(),
    )
}

/// A worker: `who` answers its own name, `echo` the payload, `count` how many calls of
/// `echo` it ran.
fn worker(engine: &Engine, address: &Address, name: &str) -> Arc<Client> {
    let w = client(engine, address, name, &["who", "echo", "count"]);
    let c = w.clone();
    let me = name.to_owned();
    std::thread::spawn(move || {
        let mut echoed = 0u64;
        while let Next::Item(call) = c.next_call(None) {
            echoed += u64::from(call.name == "echo");
            if call.flags.no_reply() {
                continue;
            }
            let out = match call.name.as_str() {
                "who" => Bytes::from(me.clone()),
                "count" => Bytes::from(echoed.to_string()),
                _ => call.payload.into_bytes(),
            };
            c.respond(call.conn, call.call_id, call.serde, call.flags.0, out);
        }
    });
    w
}

fn wait_for(c: &Client, names: &[&str]) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    c.wait_for_members(&names, Some(Duration::from_secs(5)))
        .unwrap();
}

fn who(c: &Client, receiver: Option<&str>) -> String {
    let r = c
        .call(
            receiver,
            "who",
            0,
            0,
            Bytes::new(),
            Some(Duration::from_secs(5)),
        )
        .unwrap();
    String::from_utf8(r.payload.as_slice().to_vec()).unwrap()
}

#[test]
fn calls_are_routed_round_robin_and_pinned() {
    for engine in backends() {
        let r = router(
            &engine,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 0,
            },
        );
        let addr = r.address().clone();
        let _w1 = worker(&engine, &addr, "w1");
        let _w2 = worker(&engine, &addr, "w2");
        let caller = client(&engine, &addr, "caller", &[]);
        wait_for(&caller, &["w1", "w2"]);
        assert!(caller.is_routed());
        assert_eq!(caller.peers(), ["w1", "w2"]);
        let mut seen: Vec<String> = (0..4).map(|_| who(&caller, None)).collect();
        seen.sort();
        assert_eq!(
            seen,
            ["w1", "w1", "w2", "w2"],
            "round-robin on {}",
            engine.backend()
        );
        assert_eq!(who(&caller, Some("w2")), "w2");
        assert_eq!(
            caller.cast_targets("who", None, CatchUp::Never).unwrap(),
            ["w1", "w2"]
        );

        // Large payloads pass through the router both ways.
        let big: Vec<u8> = (0..(24 << 20)).map(|i| (i % 251) as u8).collect();
        let r2 = caller
            .call(
                Some("w1"),
                "echo",
                0,
                0,
                Bytes::from(big.clone()),
                Some(Duration::from_secs(30)),
            )
            .unwrap();
        assert!(r2.payload.as_slice() == &big[..]);

        // Nobody exposes it, nobody has that name, the caller itself: refused before sending.
        for (recv, name) in [
            (None, "nope"),
            (Some("ghost"), "who"),
            (Some("caller"), "who"),
        ] {
            assert!(matches!(
                caller.call(recv, name, 0, 0, Bytes::new(), None),
                Err(CallError::Transmission(_))
            ));
        }
        r.stop();
    }
}

#[test]
fn membership_events_eviction_and_failures() {
    for engine in backends() {
        let dir = std::env::temp_dir().join(format!(
            "daffi-router-{}-{}",
            std::process::id(),
            engine.backend()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let r = router(&engine, Address::Unix(dir.join("r.sock")));
        let addr = r.address().clone();
        let caller = client(&engine, &addr, "caller", &[]);
        let w = worker(&engine, &addr, "w");
        wait_for(&caller, &["w"]);
        let ev = caller.next_event(Some(Duration::from_secs(5)));
        assert_eq!(
            ev,
            Next::Item(MemberEvent {
                connected: true,
                member: "w".into()
            })
        );
        // The worker saw the caller, which was there before it.
        assert_eq!(w.peers(), ["caller"]);
        let mut router_heard = Vec::new();
        while let Next::Item(e) = r.next_event(Some(Duration::from_millis(100))) {
            router_heard.push((e.connected, e.member));
        }
        assert_eq!(
            router_heard,
            [(true, "caller".to_string()), (true, "w".to_string())]
        );

        // A newer "w" evicts the older one, whose calls then fail with Evicted.
        let w_new = worker(&engine, &addr, "w");
        let deadline = Instant::now() + Duration::from_secs(5);
        while w.is_open() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!w.is_open());
        assert!(matches!(
            w.call(Some("caller"), "x", 0, 0, Bytes::new(), None),
            Err(CallError::Evicted(_))
        ));
        let mut heard = Vec::new();
        while let Next::Item(e) = caller.next_event(Some(Duration::from_millis(200))) {
            heard.push((e.connected, e.member));
        }
        assert_eq!(heard, [(false, "w".to_string()), (true, "w".to_string())]);
        assert_eq!(who(&caller, None), "w");

        // A callee that leaves with a call in flight fails it at once.
        let slow = client(&engine, &addr, "slow", &["hang"]);
        wait_for(&caller, &["slow"]);
        let started = Instant::now();
        let pending = caller
            .start_call(Some("slow"), "hang", 0, 0, Bytes::new(), None)
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        slow.close();
        let res = pending.wait_until(Some(Instant::now() + Duration::from_secs(5)));
        assert!(
            matches!(res, Some(Err(CallError::Disconnected(_)))),
            "{res:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(pending);

        // The router stopping fails everyone's connection.
        r.stop();
        let deadline = Instant::now() + Duration::from_secs(5);
        while (caller.is_open() || w_new.is_open()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!caller.is_open() && !w_new.is_open());
        assert!(matches!(
            caller.call(None, "who", 0, 0, Bytes::new(), None),
            Err(CallError::Disconnected(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A peer written by hand on a plain socket, to misbehave on purpose.
mod raw {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use daffi_proto::frame::{Kind, encode_head};
    use daffi_proto::{DEFAULT_MAX_MESSAGE_SIZE, HEADER_LEN, Header, Hello};

    pub struct Peer(pub TcpStream);

    impl Peer {
        /// Connects to a Router on `port` as `name` exporting `functions`, and reads the
        /// Welcome and the first Joined.
        pub fn join(port: u16, name: &str, functions: &[&str]) -> Peer {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let hello = Hello {
                max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
                functions: functions.iter().map(|f| f.to_string()).collect(),
                token: Vec::new(),
            }
            .encode();
            s.write_all(&encode_head(Kind::Hello, 0, 0, 0, name, hello.len() as u64))
                .unwrap();
            s.write_all(&hello).unwrap();
            let mut p = Peer(s);
            assert_eq!(p.frame().0.kind, Kind::Welcome);
            assert_eq!(p.frame().0.kind, Kind::Joined);
            p
        }

        /// Reads one whole frame: header, meta, payload (and trailer byte, if any).
        pub fn frame(&mut self) -> (Header, String, Vec<u8>) {
            let mut h = [0u8; HEADER_LEN];
            self.0.read_exact(&mut h).unwrap();
            let h = Header::decode(&h).unwrap();
            let mut meta = vec![0; h.meta_len as usize];
            self.0.read_exact(&mut meta).unwrap();
            let extra = u64::from(h.flags.trailer());
            let mut payload = vec![0; (h.payload_len + extra) as usize];
            self.0.read_exact(&mut payload).unwrap();
            (h, String::from_utf8(meta).unwrap(), payload)
        }

        /// Writes the start of a frame of `len` payload bytes, with only `sent` of them.
        pub fn partial(&mut self, kind: Kind, call_id: u64, meta: &str, len: u64, sent: usize) {
            self.0
                .write_all(&encode_head(kind, call_id, 0, 0, meta, len))
                .unwrap();
            self.0.write_all(&vec![5u8; sent]).unwrap();
        }
    }
}

fn tcp_router(engine: &Engine) -> (Router, Address, u16) {
    let r = router(
        engine,
        Address::Tcp {
            host: "127.0.0.1".into(),
            port: 0,
        },
    );
    let addr = r.address().clone();
    let Address::Tcp { port, .. } = addr else {
        unreachable!()
    };
    (r, addr, port)
}

#[test]
fn a_caller_that_dies_mid_payload_costs_the_worker_nothing() {
    for engine in backends() {
        let (r, addr, port) = tcp_router(&engine);
        let w = worker(&engine, &addr, "w");
        let mut dying = raw::Peer::join(port, "dying", &[]);
        wait_for(&w, &["dying"]);
        // 8 MiB announced, 3 MiB sent (the router passes on what it gets), then gone.
        dying.partial(daffi_proto::Kind::Request, 1, "w\0echo", 8 << 20, 3 << 20);
        std::thread::sleep(Duration::from_millis(200));
        drop(dying);
        let caller = client(&engine, &addr, "caller", &[]);
        wait_for(&caller, &["w"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while w.peers().contains(&"dying".to_string()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // The worker never ran the cut-off call, is still connected, and serves the next.
        assert!(w.is_open());
        let n = caller
            .call(
                None,
                "count",
                0,
                0,
                Bytes::new(),
                Some(Duration::from_secs(5)),
            )
            .unwrap();
        assert_eq!(n.payload.as_slice(), b"0", "{}", engine.backend());
        let big = Bytes::from(vec![9u8; 4 << 20]);
        let r2 = caller
            .call(
                None,
                "echo",
                0,
                0,
                big.clone(),
                Some(Duration::from_secs(10)),
            )
            .unwrap();
        assert!(r2.payload.as_slice() == &big[..], "{}", engine.backend());
        assert_eq!(who(&caller, None), "w");
        r.stop();
    }
}

#[test]
fn a_worker_that_dies_mid_answer_fails_the_call_at_once() {
    use daffi_proto::frame::Kind;
    for engine in backends() {
        let (r, addr, port) = tcp_router(&engine);
        let mut dying = raw::Peer::join(port, "dying", &["big"]);
        let caller = client(&engine, &addr, "caller", &[]);
        wait_for(&caller, &["dying"]);
        let started = Instant::now();
        let pending = caller
            .start_call(Some("dying"), "big", 0, 0, Bytes::new(), None)
            .unwrap();
        let mut req = dying.frame();
        while req.0.kind != Kind::Request {
            req = dying.frame();
        }
        assert_eq!(req.1, "caller\0big");
        dying.partial(Kind::Response, req.0.call_id, "", 8 << 20, 2 << 20);
        std::thread::sleep(Duration::from_millis(100));
        drop(dying);
        let res = pending.wait_until(Some(Instant::now() + Duration::from_secs(5)));
        assert!(
            matches!(res, Some(Err(CallError::Disconnected(_)))),
            "{res:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(pending);
        // The caller's connection survived the cut-off answer.
        assert!(caller.is_open());
        let _w = worker(&engine, &addr, "w");
        wait_for(&caller, &["w"]);
        assert_eq!(who(&caller, None), "w");
        r.stop();
    }
}

#[test]
fn a_caller_that_stops_waiting_midway_through_a_large_answer_keeps_its_connection() {
    use daffi_proto::frame::{Kind, encode_head};
    use std::io::Write;
    for engine in backends() {
        let (r, addr, port) = tcp_router(&engine);
        let mut slow = raw::Peer::join(port, "slow", &["big"]);
        let caller = client(&engine, &addr, "caller", &[]);
        wait_for(&caller, &["slow"]);
        let len = 8usize << 20;
        let second: Vec<u8> = (0..3 << 20).map(|i| (i * 11 % 251) as u8).collect();
        let expected = second.clone();
        let answering = std::thread::spawn(move || {
            let request = |slow: &mut raw::Peer| loop {
                let (h, _, _) = slow.frame();
                if h.kind == Kind::Request {
                    return h.call_id;
                }
            };
            // Small answers first, so that the caller reads its socket itself.
            for _ in 0..50 {
                let id = request(&mut slow);
                slow.0
                    .write_all(&encode_head(Kind::Response, id, 0, 0, "", 2))
                    .unwrap();
                slow.0.write_all(b"ok").unwrap();
            }
            // A large answer whose first quarter comes at once, the rest after the caller
            // stopped waiting for it.
            let id = request(&mut slow);
            slow.0
                .write_all(&encode_head(Kind::Response, id, 0, 0, "", len as u64))
                .unwrap();
            slow.0.write_all(&vec![1u8; len / 4]).unwrap();
            std::thread::sleep(Duration::from_millis(700));
            slow.0.write_all(&vec![1u8; len - len / 4]).unwrap();
            let id = request(&mut slow);
            slow.0
                .write_all(&encode_head(
                    Kind::Response,
                    id,
                    0,
                    0,
                    "",
                    second.len() as u64,
                ))
                .unwrap();
            slow.0.write_all(&second).unwrap();
            slow
        });
        let call = |timeout| caller.call(Some("slow"), "big", 0, 0, Bytes::new(), Some(timeout));
        for _ in 0..50 {
            let r = call(Duration::from_secs(5)).unwrap();
            assert_eq!(r.payload.as_slice(), b"ok");
        }
        assert_eq!(
            call(Duration::from_millis(300)).map(|_| ()),
            Err(CallError::Timeout),
            "{}",
            engine.backend()
        );
        // The rest of the abandoned answer is received and dropped; the next answer is whole.
        let r2 = call(Duration::from_secs(10)).unwrap();
        assert!(
            r2.payload.as_slice() == &expected[..],
            "{}: the next answer differs",
            engine.backend()
        );
        assert!(caller.is_open());
        drop(answering.join().unwrap());
        r.stop();
    }
}

#[test]
fn large_payloads_to_one_worker_from_many_callers_at_once() {
    for engine in backends() {
        let (r, addr, _) = tcp_router(&engine);
        let _w = worker(&engine, &addr, "w");
        let callers: Vec<Arc<Client>> = (0..3)
            .map(|i| client(&engine, &addr, &format!("c{i}"), &[]))
            .collect();
        for c in &callers {
            wait_for(c, &["w"]);
        }
        let threads: Vec<_> = callers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for round in 0..3u8 {
                        let data: Vec<u8> = (0..(6 << 20) + i * 1000)
                            .map(|k| (k as u8) ^ round ^ i as u8)
                            .collect();
                        let r = c
                            .call(None, "echo", 0, 0, Bytes::from(data.clone()), None)
                            .unwrap();
                        assert!(r.payload.as_slice() == &data[..]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        r.stop();
    }
}

#[test]
fn an_evicted_receiver_gets_its_relayed_frame_ended_then_its_goodbye() {
    use daffi_proto::Kind;
    for engine in backends() {
        let (r, addr, port) = tcp_router(&engine);
        let mut old = raw::Peer::join(port, "w", &["echo"]);
        let mut caller = raw::Peer::join(port, "caller", &[]);
        // The old "w" learns about the caller.
        assert_eq!(old.frame().0.kind, Kind::Joined);
        // 4 MiB announced, 1 MiB sent: the Router starts passing it on to "w"...
        caller.partial(Kind::Request, 1, "w\0echo", 4 << 20, 1 << 20);
        std::thread::sleep(Duration::from_millis(200));
        // ...when a newer "w" takes the name.
        let _new = worker(&engine, &addr, "w");
        let (h, meta, payload) = old.frame();
        assert_eq!((h.kind, meta.as_str()), (Kind::Request, "caller\0echo"));
        assert!(h.flags.trailer(), "{}", engine.backend());
        assert_eq!(payload.len() as u64, h.payload_len + 1);
        assert_ne!(
            *payload.last().unwrap(),
            0,
            "the cut-off frame is marked lost"
        );
        let (h, meta, _) = old.frame();
        assert_eq!(h.kind, Kind::Goodbye);
        assert!(meta.starts_with("evicted"), "{meta}");
        r.stop();
    }
}

/// A worker whose callbacks run nothing yet: past its 64 MiB of waiting calls it stops
/// reading, the Router queues at most about 16 MiB for it and then stops reading the sender,
/// whose sends wait. Others keep going meanwhile (a newcomer is not held back for joining),
/// and everything arrives once the worker catches up.
#[test]
fn a_worker_behind_holds_its_sender_back_through_the_router() {
    const CHUNKS: usize = 200;
    for engine in backends() {
        let (_r, addr, _) = tcp_router(&engine);
        let stuck = client(&engine, &addr, "stuck", &["sink"]);
        let _w = worker(&engine, &addr, "w");
        let sender = client(&engine, &addr, "sender", &[]);
        wait_for(&sender, &["stuck", "w"]);
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let flood = {
            let (sender, sent) = (sender.clone(), sent.clone());
            std::thread::spawn(move || {
                let chunk = Bytes::from(vec![7u8; 1 << 20]);
                for _ in 0..CHUNKS {
                    // Waits while more than 16 MiB of its own are unsent.
                    sender
                        .send(Some("stuck"), "sink", 0, 0, chunk.clone())
                        .unwrap();
                    sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            })
        };
        // 64 MiB waiting in the worker, 16 MiB in the Router, the kernel's buffers and the
        // sender's own 16 MiB: well under the 200 MiB.
        std::thread::sleep(Duration::from_secs(2));
        let so_far = sent.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            so_far < CHUNKS * 3 / 4,
            "{}: the sender was not held back ({so_far} sent)",
            engine.backend()
        );
        // Another client joins and calls another worker meanwhile.
        let newcomer = client(&engine, &addr, "newcomer", &[]);
        wait_for(&newcomer, &["w"]);
        let t = Instant::now();
        assert_eq!(who(&newcomer, Some("w")), "w");
        assert!(t.elapsed() < Duration::from_secs(2), "the newcomer waited");
        // The worker catches up: every chunk arrives.
        let mut got = 0;
        while got < CHUNKS {
            match stuck.next_call(Some(Duration::from_secs(20))) {
                Next::Item(call) => {
                    assert_eq!(call.payload.as_slice().len(), 1 << 20);
                    got += 1;
                }
                other => panic!("{}: chunk {got} missing: {other:?}", engine.backend()),
            }
        }
        flood.join().unwrap();
    }
}

/// A payload written in many small pieces (each its own segment: many small pieces fill a
/// relay pipe before its byte count does) to a receiver that starts reading late arrives whole
/// and in order, spliced or not.
#[test]
fn a_payload_in_small_pieces_to_a_late_reader_arrives_whole() {
    use daffi_proto::frame::{Kind, encode_head};
    use std::io::Write;
    for engine in backends() {
        let (r, _addr, port) = tcp_router(&engine);
        let mut slow = raw::Peer::join(port, "slow", &["take"]);
        let mut fast = raw::Peer::join(port, "fast", &[]);
        // Each learns of the other.
        assert_eq!(slow.frame().0.kind, Kind::Joined);
        fast.0.set_nodelay(true).unwrap();
        let len = 3 << 20;
        let data: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            fast.0
                .write_all(&encode_head(
                    Kind::Request,
                    1,
                    0,
                    0,
                    "slow\0take",
                    len as u64,
                ))
                .unwrap();
            for piece in sent.chunks(700) {
                fast.0.write_all(piece).unwrap();
            }
            fast
        });
        std::thread::sleep(Duration::from_millis(300));
        let (h, meta, payload) = slow.frame();
        assert_eq!((h.kind, meta.as_str()), (Kind::Request, "fast\0take"));
        assert_eq!(payload.len(), len + 1, "{}", engine.backend());
        assert!(
            payload[..len] == data[..],
            "{}: bytes differ",
            engine.backend()
        );
        assert_eq!(payload[len], 0, "{}: marked lost", engine.backend());
        drop(writer.join().unwrap());
        r.stop();
    }
}
