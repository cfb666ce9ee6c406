//! Engine log records go to Python's `logging`, under the `daffi.engine` logger.
//!
//! Only records at or above the level the `daffi.engine` logger is enabled for when the module
//! is imported (WARNING by default) cross over; the check is a cheap comparison on the engine
//! thread, and the GIL is taken only to hand over a record that passes it.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::prelude::*;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Forwards `tracing` events to Python's `logging`.
struct PyLogging {
    max: Level,
    next_span: AtomicU64,
}

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

fn python_level(l: &Level) -> u32 {
    match *l {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        Level::DEBUG => 10,
        Level::TRACE => 5,
    }
}

impl Subscriber for PyLogging {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.max
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut msg = Message(String::new());
        event.record(&mut msg);
        let level = python_level(event.metadata().level());
        // During interpreter shutdown the record is dropped rather than attaching to a dying
        // interpreter.
        let _ = Python::try_attach(|py| {
            let r = py
                .import("logging")
                .and_then(|l| l.call_method1("getLogger", ("daffi.engine",)))
                .and_then(|logger| logger.call_method1("log", (level, msg.0)));
            if let Err(e) = r {
                e.print(py);
            }
        });
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// Installs the bridge, at the level `logging.getLogger("daffi.engine")` is enabled for.
pub fn install(py: Python<'_>) -> PyResult<()> {
    let logger = py
        .import("logging")?
        .call_method1("getLogger", ("daffi.engine",))?;
    let effective: u32 = logger.call_method0("getEffectiveLevel")?.extract()?;
    let max = match effective {
        0..=5 => Level::TRACE,
        6..=10 => Level::DEBUG,
        11..=20 => Level::INFO,
        21..=30 => Level::WARN,
        _ => Level::ERROR,
    };
    // Another global subscriber (an embedding Rust program) wins; that is fine.
    let _ = tracing::subscriber::set_global_default(PyLogging {
        max,
        next_span: AtomicU64::new(0),
    });
    Ok(())
}
