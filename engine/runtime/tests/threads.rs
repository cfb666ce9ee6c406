//! Several engine threads per backend: nodes are spread over them and still reach each other.
//! (Its own test binary: the thread count is fixed at the first engine's start.)

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use daffi_runtime::{
    Address, Backend, Client, ClientConfig, Engine, Next, Node, Server, ServerConfig,
    engine_threads, set_engine_threads,
};

const THREADS: usize = 3;

fn engine_thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|t| {
            let comm = t.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|c| c.trim() == "daffi-engine")
        })
        .count()
}

#[test]
fn nodes_spread_over_the_engine_threads_and_talk_across_them() {
    set_engine_threads(THREADS).unwrap();
    assert!(
        set_engine_threads(THREADS).is_ok(),
        "setting the same count again is fine"
    );
    assert!(set_engine_threads(THREADS + 1).is_err());
    assert!(set_engine_threads(0).is_err());
    assert_eq!(engine_threads().unwrap(), THREADS);

    let mut backends = vec![Backend::Poll];
    if Engine::get(Backend::Uring).is_ok() {
        backends.push(Backend::Uring);
    }
    let count = backends.len();
    for backend in backends {
        // Handed out in turn.
        let picks: Vec<Engine> = (0..=THREADS)
            .map(|_| Engine::get(backend).unwrap())
            .collect();
        for a in 0..THREADS {
            for b in 0..a {
                assert!(!picks[a].same_thread(&picks[b]));
            }
        }
        assert!(picks[THREADS].same_thread(&picks[0]));
        let server = Arc::new(
            Server::start(
                &Engine::get(backend).unwrap(),
                ServerConfig {
                    name: "svc".into(),
                    address: Address::Tcp {
                        host: "127.0.0.1".into(),
                        port: 0,
                    },
                    max_message_size: 64 << 20,
                    functions: vec!["echo".into()],
                    token: Vec::new(),
                    serde_formats: None,
                },
            )
            .unwrap(),
        );
        let s = server.clone();
        let serving = std::thread::spawn(move || {
            while let Next::Item(call) = s.next_call(None) {
                s.respond(
                    call.conn,
                    call.call_id,
                    call.serde,
                    call.flags.0,
                    call.payload.into_bytes(),
                );
            }
        });
        // Each backend started all of its threads.
        assert_eq!(engine_thread_count(), THREADS * count);
        // More clients than threads, each on the next thread in turn, calling at once.
        let callers: Vec<_> = (0..2 * THREADS)
            .map(|n| {
                let engine = Engine::get(backend).unwrap();
                let address = server.address().clone();
                std::thread::spawn(move || {
                    let c = Client::connect(
                        &engine,
                        ClientConfig {
                            name: format!("c{n}"),
                            address,
                            max_message_size: 64 << 20,
                            functions: vec![],
                            connect_timeout: Duration::from_secs(5),
                            token: Vec::new(),
                        },
                    )
                    .unwrap();
                    for k in 0..200u32 {
                        let msg = format!("{n}:{k}");
                        let r = c
                            .call(None, "echo", 2, 0, Bytes::from(msg.clone()), None)
                            .unwrap();
                        assert_eq!(r.payload.as_slice(), msg.as_bytes());
                    }
                    let big = Bytes::from(vec![n as u8; 3 << 20]);
                    let r = c
                        .call(
                            None,
                            "echo",
                            0,
                            0,
                            big.clone(),
                            Some(Duration::from_secs(20)),
                        )
                        .unwrap();
                    assert!(r.payload.as_slice() == &big[..]);
                    c.close();
                })
            })
            .collect();
        for t in callers {
            t.join().unwrap();
        }
        server.stop();
        serving.join().unwrap();
    }
}
