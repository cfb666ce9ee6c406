//! Loopback echo through the whole engine (server and client in this process), per backend.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use daffi_runtime::{
    Address, Backend, Client, ClientConfig, Engine, Next, Node, Server, ServerConfig,
};

fn pair(engine: &Engine) -> (Arc<Server>, Client) {
    let server = Arc::new(
        Server::start(
            engine,
            ServerConfig {
                name: "bench-svc".into(),
                address: Address::Tcp {
                    host: "127.0.0.1".into(),
                    port: 0,
                },
                max_message_size: 1 << 30,
                functions: vec!["echo".into()],
                token: Vec::new(),
                serde_formats: None,
            },
        )
        .expect("server"),
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
    let client = Client::connect(
        engine,
        ClientConfig {
            name: "bench-cli".into(),
            address: server.address().clone(),
            max_message_size: 1 << 30,
            functions: vec![],
            connect_timeout: Duration::from_secs(5),
            token: Vec::new(),
        },
    )
    .expect("client");
    (server, client)
}

fn loopback(c: &mut Criterion) {
    for backend in [Backend::Uring, Backend::Poll] {
        let Ok(engine) = Engine::get(backend) else {
            continue;
        };
        let (server, client) = pair(&engine);
        let mut g = c.benchmark_group(format!("loopback_{}", engine.backend()));
        for size in [1500usize, 1 << 20, 28 << 20] {
            let payload = Bytes::from(vec![7u8; size]);
            g.throughput(Throughput::Bytes(2 * size as u64));
            if size > 1 << 20 {
                g.sample_size(10);
            }
            g.bench_function(format!("echo_{size}"), |b| {
                b.iter(|| {
                    client
                        .call(None, "echo", 0, 0, payload.clone(), None)
                        .expect("echo")
                })
            });
        }
        g.finish();
        client.close();
        server.stop();
    }
}

criterion_group!(benches, loopback);
criterion_main!(benches);
