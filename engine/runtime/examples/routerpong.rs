//! Sequential small calls and a large echo through a Router, each node in its own process:
//! `cargo run --release --example routerpong -- [uring|poll] router PORT`, then
//! `... worker PORT` and `... caller PORT` in two more processes. Compare with `pingpong`
//! (the same measurements without the Router).

use std::time::{Duration, Instant};

use bytes::Bytes;
use daffi_runtime::{
    Address, Backend, Client, ClientConfig, Engine, Next, Node, Router, RouterConfig,
};

fn client(engine: &Engine, port: u16, name: &str, functions: Vec<String>) -> Client {
    Client::connect(
        engine,
        ClientConfig {
            name: name.into(),
            address: Address::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            max_message_size: 1 << 30,
            functions,
            token: Vec::new(),
            connect_timeout: Duration::from_secs(5),
        },
    )
    .expect("connect")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let backend = Backend::parse(args.get(1).map_or("", |s| s)).expect("uring|poll|auto");
    let role = args.get(2).map_or("", |s| s.as_str());
    let port: u16 = args.get(3).and_then(|p| p.parse().ok()).expect("a port");
    let engine = Engine::get(backend).unwrap();
    match role {
        "router" => {
            let _router = Router::start(
                &engine,
                RouterConfig {
                    name: "router".into(),
                    address: Address::Tcp {
                        host: "127.0.0.1".into(),
                        port,
                    },
                    max_message_size: 1 << 30,
                    token: Vec::new(),
                },
            )
            .unwrap();
            println!("routing on 127.0.0.1:{port} ({})", engine.backend());
            std::thread::park();
        }
        "worker" => {
            let w = client(&engine, port, "worker", vec!["echo".into()]);
            println!("worker connected ({})", engine.backend());
            while let Next::Item(c) = w.next_call(None) {
                w.respond(
                    c.conn,
                    c.call_id,
                    c.serde,
                    c.flags.0,
                    c.payload.into_bytes(),
                );
            }
        }
        "caller" => {
            let c = client(&engine, port, "caller", Vec::new());
            c.wait_for_members(&["worker".into()], Some(Duration::from_secs(10)))
                .expect("the worker");
            let small = Bytes::from(vec![7u8; 1500]);
            let call = |p: &Bytes| {
                c.call(None, "echo", 0, 0, p.clone(), Some(Duration::from_secs(30)))
                    .unwrap()
            };
            for _ in 0..2000 {
                call(&small);
            }
            let n = 20000;
            let t = Instant::now();
            for _ in 0..n {
                call(&small);
            }
            let dt = t.elapsed();
            println!(
                "small: {:.1} us per round trip ({:.0} calls/s)",
                dt.as_secs_f64() * 1e6 / n as f64,
                n as f64 / dt.as_secs_f64()
            );
            let big = Bytes::from(vec![1u8; 28 << 20]);
            call(&big);
            let n = 20;
            let t = Instant::now();
            for _ in 0..n {
                call(&big);
            }
            let dt = t.elapsed().as_secs_f64();
            println!(
                "28 MiB echo: {:.2} GiB/s",
                (2 * n * big.len()) as f64 / dt / (1u64 << 30) as f64
            );
        }
        _ => panic!("role: router | worker | caller"),
    }
}
