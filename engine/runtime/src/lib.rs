//! daffi's engine: the event loop that drives the wire protocol over a driver, and the nodes
//! (servers and clients) that bindings use from their own threads.
//!
//! ```text
//!  binding threads                      engine thread (one per backend, shared by all nodes)
//!  ───────────────                      ─────────────────────────────────────────────────────
//!  Client::call ── Command ──► queue ──► Loop: proto::Connection ◄──► driver (uring | poll)
//!        ▲                                  │
//!        └──── Slot (condvar) ◄── Response ─┤
//!  Server::next_call ◄── Inbox ◄── Request ─┘
//! ```
//!
//! The engine never runs user code and never decodes payloads; it never blocks on anything but
//! its driver. Bindings wait on [`call::Slot`]s and [`inbox::Inbox`]es, which wake exactly the
//! waiting thread.
//!
//! Not here: the wire format and handshake (`daffi-proto`), syscalls (`daffi-driver`), Python
//! (`ffi/`).

pub mod call;
mod direct;
pub mod engine;
pub mod inbox;
pub mod node;
pub mod notify;
pub mod payload;
pub mod spin;
mod wire;

pub use call::{CallError, Reply};
pub use daffi_driver::sys::{advise_huge, tune_allocator};
pub use daffi_driver::{Backend, Body, RawBuf};
pub use daffi_proto::{DEFAULT_MAX_MESSAGE_SIZE, Flags, Peer};
pub use engine::{Engine, MAX_ENGINE_THREADS, engine_threads, set_engine_threads};
pub use inbox::Next;
pub use node::{
    Address, CatchUp, Client, ClientConfig, IncomingCall, Listening, MemberEvent, Node, NodeCore,
    PendingCall, Router, RouterConfig, Server, ServerConfig, StartError,
};
pub use notify::{Completions, Notifier};
pub use payload::{Payload, set_body_allocator};
