//! End-to-end through a Router on loopback, on every backend: routing, round-robin, large
//! payloads, membership, eviction and failures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use daffi_runtime::{
    Address, Backend, CallError, Client, ClientConfig, DEFAULT_MAX_MESSAGE_SIZE, Engine,
    MemberEvent, Next, Node, Router, RouterConfig,
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

/// A worker: `who` answers its own name, `echo` the payload.
fn worker(engine: &Engine, address: &Address, name: &str) -> Arc<Client> {
    let w = client(engine, address, name, &["who", "echo"]);
    let c = w.clone();
    let me = name.to_owned();
    std::thread::spawn(move || {
        while let Next::Item(call) = c.next_call(None) {
            if call.flags.no_reply() {
                continue;
            }
            let out = if call.name == "who" {
                Bytes::from(me.clone())
            } else {
                call.payload.into_bytes()
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
        assert_eq!(caller.cast_targets("who", None).unwrap(), ["w1", "w2"]);

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
            .start_call(Some("slow"), "hang", 0, 0, Bytes::new())
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
