//! Sequential small calls and a large echo between a server and a client.
//! `cargo run --release --example pingpong -- [uring|poll] [PORT]`: with a port, only the
//! client runs, against a server started with `-- [uring|poll] serve` in another process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use daffi_runtime::{
    Address, Backend, Client, ClientConfig, Engine, Next, Node, Server, ServerConfig,
};

fn main() {
    let backend =
        Backend::parse(&std::env::args().nth(1).unwrap_or_default()).expect("uring|poll|auto");
    let engine = Engine::get(backend).unwrap();
    let arg = std::env::args().nth(2);
    let port: u16 = match arg.as_deref() {
        Some("serve") => 7878,
        _ => 0,
    };
    let server = Arc::new(
        Server::start(
            &engine,
            ServerConfig {
                name: "svc".into(),
                address: Address::Tcp {
                    host: "127.0.0.1".into(),
                    port,
                },
                max_message_size: 1 << 30,
                functions: vec!["echo".into()],
                token: Vec::new(),
                serde_formats: None,
            },
        )
        .unwrap(),
    );
    let s = server.clone();
    std::thread::spawn(move || {
        while let Next::Item(c) = s.next_call(None) {
            s.respond(
                c.conn,
                c.call_id,
                c.serde,
                c.flags.0,
                c.payload.into_bytes(),
            );
        }
    });
    if arg.as_deref() == Some("serve") {
        println!("serving on 127.0.0.1:{port}");
        std::thread::park();
    }
    let address = match arg.as_deref().and_then(|a| a.parse::<u16>().ok()) {
        Some(p) => Address::Tcp {
            host: "127.0.0.1".into(),
            port: p,
        },
        None => server.address().clone(),
    };
    let client = Client::connect(
        &engine,
        ClientConfig {
            name: "cli".into(),
            address,
            max_message_size: 1 << 30,
            functions: vec![],
            connect_timeout: Duration::from_secs(5),
            token: Vec::new(),
        },
    )
    .unwrap();
    let small = Bytes::from(vec![7u8; 1500]);
    let n = 50_000;
    let t = Instant::now();
    for _ in 0..n {
        client
            .call(None, "echo", 0, 0, small.clone(), None)
            .unwrap();
    }
    println!(
        "{}: {:.0} calls/s",
        engine.backend(),
        n as f64 / t.elapsed().as_secs_f64()
    );
    for size in [28usize << 20, 256 << 20] {
        let big = Bytes::from(vec![1u8; size]);
        client.call(None, "echo", 0, 0, big.clone(), None).unwrap();
        let k = 5;
        let t = Instant::now();
        for _ in 0..k {
            client.call(None, "echo", 0, 0, big.clone(), None).unwrap();
        }
        let dt = t.elapsed().as_secs_f64() / k as f64;
        println!(
            "{} MiB echo: {:.2} GiB/s",
            size >> 20,
            2.0 * size as f64 / dt / (1u64 << 30) as f64
        );
    }
}
