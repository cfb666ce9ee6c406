//! What the runtime's integration tests share: the engines to test, an echo server, a client.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use daffi_runtime::{
    Address, Backend, Client, ClientConfig, DEFAULT_MAX_MESSAGE_SIZE, Engine, Next, Node, Server,
    ServerConfig,
};

pub fn backends() -> Vec<Engine> {
    let mut v = vec![Engine::get(Backend::Poll).unwrap()];
    match Engine::get(Backend::Uring) {
        Ok(e) => v.push(e),
        Err(e) => eprintln!("io_uring unavailable here, testing poll only: {e}"),
    }
    v
}

/// Serves `echo` (answers the payload) and `fail` (answers an error) on a thread.
pub fn serve(engine: &Engine, address: Address) -> Arc<Server> {
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

pub fn client(engine: &Engine, address: Address, name: &str) -> Client {
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

pub fn tcp_port(server: &Server) -> Address {
    server.address().clone()
}
