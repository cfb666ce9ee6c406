//! End-to-end: a server and clients on loopback TCP and Unix sockets, on every backend.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use daffi_runtime::{Address, CallError, MemberEvent, Next, Node, Server, ServerConfig};

mod support;

use support::{backends, client, serve, tcp_port};

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
