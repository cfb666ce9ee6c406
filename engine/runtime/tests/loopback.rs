//! End-to-end: a server and clients on loopback TCP and Unix sockets, on every backend.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use daffi_runtime::{
    Address, Backend, CallError, Client, ClientConfig, DEFAULT_MAX_MESSAGE_SIZE, Engine,
    MemberEvent, Next, Node, Server, ServerConfig,
};

fn backends() -> Vec<Engine> {
    let mut v = vec![Engine::get(Backend::Poll).unwrap()];
    match Engine::get(Backend::Uring) {
        Ok(e) => v.push(e),
        Err(e) => eprintln!("io_uring unavailable here, testing poll only: {e}"),
    }
    v
}

/// Serves `echo` (answers the payload) and `fail` (answers an error) on a thread.
fn serve(engine: &Engine, address: Address) -> Arc<Server> {
    let server = Arc::new(
        Server::start(
            engine,
            ServerConfig {
                name: "svc".into(),
                address,
                max_message_size: 64 << 20,
                functions: vec!["echo".into(), "fail".into()],
                token: Vec::new(),
                serde_formats: None,
            },
        )
        .unwrap(),
    );
    let s = server.clone();
    std::thread::spawn(move || {
        while let Next::Item(call) = s.next_call(None) {
            if call.flags.no_reply() {
                continue;
            }
            if call.name == "fail" {
                s.respond_error(
                    call.conn,
                    call.call_id,
                    "remote",
                    Bytes::from_static(b"boom"),
                );
            } else {
                s.respond(
                    call.conn,
                    call.call_id,
                    call.serde,
                    call.flags.0,
                    call.payload.into_bytes(),
                );
            }
        }
    });
    server
}

fn client(engine: &Engine, address: Address, name: &str) -> Client {
    Client::connect(
        engine,
        ClientConfig {
            name: name.into(),
            address,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            functions: vec![],
            connect_timeout: Duration::from_secs(5),
            token: Vec::new(),
        },
    )
    .unwrap()
}

fn tcp_port(server: &Server) -> Address {
    server.address().clone()
}

#[test]
fn calls_small_and_large_over_tcp_and_unix() {
    for engine in backends() {
        let dir = std::env::temp_dir().join(format!(
            "daffi-rt-{}-{}",
            std::process::id(),
            engine.backend()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let unix = Address::Unix(dir.join("s.sock"));
        for address in [
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 0,
            },
            unix,
        ] {
            let server = serve(&engine, address);
            let c = client(&engine, tcp_port(&server), "c1");
            assert_eq!(c.peer().unwrap().name, "svc");
            let r = c
                .call(None, "echo", 2, 0, Bytes::from_static(b"hello"), None)
                .unwrap();
            assert_eq!(r.payload.as_slice(), b"hello");
            let big: Vec<u8> = (0..(20 << 20)).map(|i: u32| (i % 253) as u8).collect();
            let r = c
                .call(
                    None,
                    "echo",
                    0,
                    0,
                    Bytes::from(big.clone()),
                    Some(Duration::from_secs(20)),
                )
                .unwrap();
            assert!(
                r.payload.as_slice() == big,
                "large payload corrupted on {}",
                engine.backend()
            );
            assert_eq!(
                c.call(None, "fail", 2, 0, Bytes::new(), None),
                Err(CallError::Remote(b"boom".to_vec()))
            );
            assert!(matches!(
                c.call(None, "nope", 2, 0, Bytes::new(), None),
                Err(CallError::Transmission(_))
            ));
            // Many callers on one connection each get their own answer.
            let c = Arc::new(c);
            let threads: Vec<_> = (0..8)
                .map(|t| {
                    let c = c.clone();
                    std::thread::spawn(move || {
                        for i in 0..200u32 {
                            let p = format!("{t}-{i}");
                            let r = c
                                .call(None, "echo", 2, 0, Bytes::from(p.clone()), None)
                                .unwrap();
                            assert_eq!(r.payload.as_slice(), p.as_bytes());
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            c.close();
            server.stop();
        }
    }
}

#[test]
fn membership_events_and_stop() {
    for engine in backends() {
        let server = serve(
            &engine,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 0,
            },
        );
        let c = client(&engine, tcp_port(&server), "member-a");
        let ev = server.next_event(Some(Duration::from_secs(2)));
        assert_eq!(
            ev,
            Next::Item(MemberEvent {
                connected: true,
                member: "member-a".into()
            })
        );
        assert_eq!(server.members(), ["member-a"]);
        c.close();
        let ev = server.next_event(Some(Duration::from_secs(2)));
        assert_eq!(
            ev,
            Next::Item(MemberEvent {
                connected: false,
                member: "member-a".into()
            })
        );
        let c = client(&engine, tcp_port(&server), "member-b");
        let started = Instant::now();
        server.stop();
        assert!(started.elapsed() < Duration::from_secs(2));
        // The client learns at once that the server went away.
        let e = c
            .call(
                None,
                "echo",
                2,
                0,
                Bytes::new(),
                Some(Duration::from_secs(5)),
            )
            .unwrap_err();
        assert!(matches!(e, CallError::Disconnected(_)), "{e:?}");
        // And the port is free again right away.
        let Address::Tcp { port, .. } = server.address().clone() else {
            unreachable!()
        };
        let again = serve(
            &engine,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
        );
        again.stop();
    }
}

#[test]
fn timeouts_leave_the_connection_usable() {
    for engine in backends() {
        // A server whose calls are answered late, by hand.
        let server = Server::start(
            &engine,
            ServerConfig {
                name: "slow".into(),
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
        .unwrap();
        let c = client(&engine, server.address().clone(), "c");
        let e = c
            .call(
                None,
                "f",
                2,
                0,
                Bytes::from_static(b"1"),
                Some(Duration::from_millis(50)),
            )
            .unwrap_err();
        assert_eq!(e, CallError::Timeout);
        let Next::Item(late) = server.next_call(Some(Duration::from_secs(1))) else {
            panic!()
        };
        server.respond(late.conn, late.call_id, 2, 0, Bytes::from_static(b"late"));
        let c = Arc::new(c);
        let c2 = c.clone();
        let h = std::thread::spawn(move || {
            c2.call(
                None,
                "f",
                2,
                0,
                Bytes::from_static(b"2"),
                Some(Duration::from_secs(5)),
            )
        });
        let Next::Item(call) = server.next_call(Some(Duration::from_secs(2))) else {
            panic!()
        };
        assert_eq!(call.payload.as_slice(), b"2");
        server.respond(call.conn, call.call_id, 2, 0, Bytes::from_static(b"fresh"));
        assert_eq!(h.join().unwrap().unwrap().payload.as_slice(), b"fresh");
        // Oversized requests are refused before they leave.
        let e = c
            .call(None, "f", 0, 0, Bytes::from(vec![0u8; 2 << 20]), None)
            .unwrap_err();
        assert!(matches!(e, CallError::Transmission(m) if m.contains("limit")));
        server.stop();
    }
}

/// Back-pressure end to end: a client sending no-reply calls faster than the Service's worker
/// runs them is held back (its sends wait, the Service stops reading), so what is sent but not
/// yet run stays bounded, whatever the total; and nothing is lost.
#[test]
fn a_slow_service_holds_back_a_fast_sender() {
    const CALLS: usize = 200;
    const SIZE: usize = 1 << 20;
    for engine in backends() {
        let server = Arc::new(
            Server::start(
                &engine,
                ServerConfig {
                    name: "slow".into(),
                    address: Address::Tcp {
                        host: "127.0.0.1".into(),
                        port: 0,
                    },
                    max_message_size: 64 << 20,
                    functions: vec!["sink".into()],
                    token: Vec::new(),
                    serde_formats: None,
                },
            )
            .unwrap(),
        );
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s, d) = (server.clone(), done.clone());
        let worker = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while let Next::Item(call) = s.next_call(None) {
                assert_eq!(call.payload.len(), SIZE);
                seen.push(call.payload.as_slice()[0]);
                std::thread::sleep(Duration::from_millis(2));
                d.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            seen
        });
        // The Service's waiting calls, sampled while the flood goes on.
        let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (s, f) = (server.clone(), flooding.clone());
        let sampler = std::thread::spawn(move || {
            let mut most = 0;
            while f.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(s.backlog().1);
                std::thread::sleep(Duration::from_micros(200));
            }
            most
        });
        let c = client(&engine, server.address().clone(), "flood");
        for i in 0..CALLS {
            let mut payload = vec![0u8; SIZE];
            payload[0] = i as u8;
            c.send(None, "sink", 0, 0, Bytes::from(payload)).unwrap();
        }
        // Sent but not run yet, at most: the client's 16 MiB (+ one call), what the sockets
        // hold, and the Service's 64 MiB of waiting calls (+ one receive). Without
        // back-pressure the whole 200 MiB would be sent before a tenth of it ran.
        let ran = done.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            ran >= CALLS - 120,
            "{}: only {ran} of {CALLS} calls ran when the last one was sent",
            engine.backend()
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while done.load(std::sync::atomic::Ordering::SeqCst) < CALLS {
            assert!(Instant::now() < deadline, "calls lost");
            std::thread::sleep(Duration::from_millis(10));
        }
        flooding.store(false, std::sync::atomic::Ordering::SeqCst);
        // The Service stops reading past 64 MiB waiting; one receive more may land.
        let most = sampler.join().unwrap();
        assert!(
            most <= (64 << 20) + 2 * SIZE + 4096,
            "{}: {most} bytes of calls waited in the Service",
            engine.backend()
        );
        server.stop();
        let seen = worker.join().unwrap();
        let expected: Vec<u8> = (0..CALLS).map(|i| i as u8).collect();
        assert_eq!(seen, expected, "{}: calls out of order", engine.backend());
    }
}

/// A client whose calls come one at a time receives their answers on the calling thread
/// (the engine parks the connection). Everything else still works around it: a large answer
/// and a remote error in between, several threads calling at once, a timed-out call whose late
/// answer must not be taken for the next one's, and a server that goes away while nobody calls.
#[test]
fn sequential_callers_receive_their_own_answers() {
    for engine in backends() {
        let server = serve(
            &engine,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 0,
            },
        );
        let c = Arc::new(client(&engine, server.address().clone(), "seq"));
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
        // A large answer is left to the engine; the small ones after it go direct again.
        echo(&c, vec![7u8; 3 << 20]);
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
#[test]
fn late_answers_read_by_a_caller_are_dropped() {
    for engine in backends() {
        let server = Arc::new(
            Server::start(
                &engine,
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
        let c = client(&engine, server.address().clone(), "impatient");
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
#[test]
fn service_workers_receive_their_own_requests() {
    for engine in backends() {
        let server = Arc::new(
            Server::start(
                &engine,
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
        let c = Arc::new(client(&engine, server.address().clone(), "one"));
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
        let c2 = client(&engine, server.address().clone(), "two");
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
