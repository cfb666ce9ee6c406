//! Each driver capability, on every backend this machine has.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use daffi_driver::{
    AnyDriver, Backend, Body, Completion, Driver, HeapBuf, Op, Outcome, RecvBuf, sys,
};

fn drivers() -> Vec<AnyDriver> {
    #[cfg_attr(not(all(target_os = "linux", feature = "io-uring")), allow(unused_mut))]
    let mut v = vec![AnyDriver::new(Backend::Poll).unwrap()];
    #[cfg(all(target_os = "linux", feature = "io-uring"))]
    match AnyDriver::new(Backend::Uring) {
        Ok(d) => v.push(d),
        Err(e) => eprintln!("io_uring unavailable here, testing poll only: {e}"),
    }
    v
}

/// Waits until a completion for `token` arrives (others are kept for later).
fn wait_for(d: &mut AnyDriver, pending: &mut Vec<Completion>, token: u64) -> Completion {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(i) = pending.iter().position(|c| c.token == token) {
            return pending.remove(i);
        }
        assert!(
            Instant::now() < deadline,
            "{}: no completion for token {token}",
            d.name()
        );
        d.wait(pending, Some(Duration::from_millis(100))).unwrap();
    }
}

/// Submits a splice and waits for its result.
#[cfg(target_os = "linux")]
fn splice(
    d: &mut AnyDriver,
    pending: &mut Vec<Completion>,
    token: u64,
    op: Op,
) -> std::io::Result<usize> {
    d.submit(token, op);
    let Outcome::Spliced { res, .. } = wait_for(d, pending, token).outcome else {
        panic!("{}: not a splice", d.name())
    };
    res
}

/// A listener, and a connected pair: (accepted server side, std client side).
fn pair(d: &mut AnyDriver, pending: &mut Vec<Completion>) -> (OwnedFd, OwnedFd, TcpStream) {
    let (listener, addr) = sys::listen_tcp("127.0.0.1", 0).unwrap();
    d.submit(
        1,
        Op::Accept {
            fd: listener.as_raw_fd(),
        },
    );
    let client = TcpStream::connect(addr).unwrap();
    let c = wait_for(d, pending, 1);
    let Outcome::Accepted { res, more } = c.outcome else {
        panic!("not an accept")
    };
    assert!(more, "{}: multishot accept ended early", d.name());
    let server = res.unwrap();
    sys::prepare_accepted(&server).unwrap();
    (listener, server, client)
}

#[test]
fn accept_many_then_cancel() {
    for mut d in drivers() {
        let mut pending = Vec::new();
        let (listener, addr) = sys::listen_tcp("127.0.0.1", 0).unwrap();
        d.submit(
            7,
            Op::Accept {
                fd: listener.as_raw_fd(),
            },
        );
        let clients: Vec<_> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for _ in 0..3 {
            let c = wait_for(&mut d, &mut pending, 7);
            assert!(
                matches!(
                    c.outcome,
                    Outcome::Accepted {
                        res: Ok(_),
                        more: true
                    }
                ),
                "{}",
                d.name()
            );
        }
        d.cancel_accept(7);
        let c = wait_for(&mut d, &mut pending, 7);
        assert!(
            matches!(c.outcome, Outcome::Accepted { more: false, .. }),
            "{}",
            d.name()
        );
        drop(clients);
        d.close(listener);
    }
}

#[test]
fn receive_into_vec_and_body_then_end_of_stream() {
    for mut d in drivers() {
        let mut pending = Vec::new();
        let (listener, server, mut client) = pair(&mut d, &mut pending);
        client.write_all(b"hello").unwrap();
        d.submit(
            2,
            Op::Recv {
                fd: server.as_raw_fd(),
                buf: RecvBuf::Vec(Vec::with_capacity(64)),
                max: 64,
            },
        );
        let Outcome::Recv {
            buf: RecvBuf::Vec(v),
            res,
        } = wait_for(&mut d, &mut pending, 2).outcome
        else {
            panic!()
        };
        assert_eq!((res.unwrap(), &v[..]), (5, &b"hello"[..]), "{}", d.name());

        // A large body is received straight into its own buffer, never past its end.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
        let writer = {
            let mut c = client.try_clone().unwrap();
            let big = big.clone();
            std::thread::spawn(move || {
                c.write_all(&big).unwrap();
                c.write_all(b"tail").unwrap();
            })
        };
        let mut body = Body::new(Box::new(HeapBuf::new(big.len()).unwrap()));
        while !body.is_full() {
            let want = body.capacity() - body.len();
            d.submit(
                3,
                Op::Recv {
                    fd: server.as_raw_fd(),
                    buf: RecvBuf::Body(body),
                    max: want,
                },
            );
            let Outcome::Recv {
                buf: RecvBuf::Body(b),
                res,
            } = wait_for(&mut d, &mut pending, 3).outcome
            else {
                panic!()
            };
            assert!(res.unwrap() > 0);
            body = b;
        }
        assert!(body.as_slice() == &big[..], "{}: body differs", d.name());
        writer.join().unwrap();
        let mut rest = Vec::new();
        while rest.len() < 4 {
            d.submit(
                4,
                Op::Recv {
                    fd: server.as_raw_fd(),
                    buf: RecvBuf::Vec(Vec::with_capacity(16)),
                    max: 16,
                },
            );
            let Outcome::Recv {
                buf: RecvBuf::Vec(v),
                res,
            } = wait_for(&mut d, &mut pending, 4).outcome
            else {
                panic!()
            };
            res.unwrap();
            rest.extend(v);
        }
        assert_eq!(rest, b"tail");

        drop(client);
        d.submit(
            5,
            Op::Recv {
                fd: server.as_raw_fd(),
                buf: RecvBuf::Vec(Vec::with_capacity(16)),
                max: 16,
            },
        );
        let Outcome::Recv { res, .. } = wait_for(&mut d, &mut pending, 5).outcome else {
            panic!()
        };
        assert_eq!(res.unwrap(), 0, "{}: end of stream", d.name());
        d.close(server);
        d.close(listener);
    }
}

/// Receives into a fresh 64 KiB vector on `fd`: (bytes received, the bytes).
fn recv_once(
    d: &mut AnyDriver,
    pending: &mut Vec<Completion>,
    fd: i32,
    token: u64,
) -> (usize, Vec<u8>) {
    d.submit(
        token,
        Op::Recv {
            fd,
            buf: RecvBuf::Vec(Vec::with_capacity(64 * 1024)),
            max: 64 * 1024,
        },
    );
    let Outcome::Recv {
        buf: RecvBuf::Vec(v),
        res,
    } = wait_for(d, pending, token).outcome
    else {
        panic!("{}: not a receive", d.name())
    };
    (res.unwrap(), v)
}

#[test]
fn short_receives_miss_neither_later_bytes_nor_the_end_of_stream() {
    for mut d in drivers() {
        let mut pending = Vec::new();
        let (listener, server, mut client) = pair(&mut d, &mut pending);
        let fd = server.as_raw_fd();
        // Bytes that come after a receive that took everything there was.
        for i in 0..50u8 {
            client.write_all(&[i; 10]).unwrap();
            assert_eq!(recv_once(&mut d, &mut pending, fd, 2), (10, vec![i; 10]));
        }
        // The last bytes and the end of the stream at once: a short receive, then the end,
        // with nothing new to announce it.
        client.write_all(b"bye").unwrap();
        drop(client);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(recv_once(&mut d, &mut pending, fd, 3), (3, b"bye".to_vec()));
        assert_eq!(
            recv_once(&mut d, &mut pending, fd, 4).0,
            0,
            "{}: end of stream",
            d.name()
        );
        d.close(server);

        // The same with the end coming a little after the bytes.
        let (accepted, mut client) = {
            let (l2, s2, c2) = pair(&mut d, &mut pending);
            d.close(l2);
            (s2, c2)
        };
        let fd = accepted.as_raw_fd();
        client.write_all(b"last").unwrap();
        assert_eq!(
            recv_once(&mut d, &mut pending, fd, 5),
            (4, b"last".to_vec())
        );
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(client);
        });
        assert_eq!(
            recv_once(&mut d, &mut pending, fd, 6).0,
            0,
            "{}: end of stream",
            d.name()
        );
        closer.join().unwrap();
        d.close(accepted);
        d.close(listener);
    }
}

#[test]
fn vectored_sends_resume_after_partial_writes() {
    // Copied, then zero-copy (`SENDMSG_ZC` where the kernel has it: its buffers stay with the
    // driver until the kernel lets go of them, after the completion).
    for (mut d, zero_copy) in drivers()
        .into_iter()
        .map(|d| (d, false))
        .chain(drivers().into_iter().map(|d| (d, true)))
    {
        let mut pending = Vec::new();
        let (listener, server, mut client) = pair(&mut d, &mut pending);
        let parts: Vec<Bytes> = (0..40u8).map(|i| Bytes::from(vec![i; 100_000])).collect();
        let expected: Vec<u8> = parts.iter().flat_map(|b| b.iter().copied()).collect();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 4_000_000];
            client.read_exact(&mut got).unwrap();
            got
        });
        let (mut bufs, mut skip) = (parts, 0);
        while skip < sys::total_len(&bufs) {
            d.submit(
                6,
                Op::Send {
                    zero_copy,
                    fd: server.as_raw_fd(),
                    bufs,
                    skip,
                },
            );
            let Outcome::Sent {
                bufs: b,
                skip: s,
                res,
            } = wait_for(&mut d, &mut pending, 6).outcome
            else {
                panic!()
            };
            let n = res.unwrap();
            assert!(n > 0);
            bufs = b;
            skip = s + n;
        }
        assert!(
            reader.join().unwrap() == expected,
            "{} (zero copy {zero_copy}, supported {}): bytes differ",
            d.name(),
            d.zero_copy_send()
        );
        d.close(server);
        d.close(listener);
    }
}

#[test]
fn waker_interrupts_a_wait() {
    for mut d in drivers() {
        let waker: Arc<dyn daffi_driver::Wake> = d.waker();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            waker.wake();
        });
        let started = Instant::now();
        let mut out = Vec::new();
        d.wait(&mut out, Some(Duration::from_secs(10))).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{}: wake-up lost",
            d.name()
        );
        t.join().unwrap();
    }
}

#[test]
fn unix_connect_gives_up_when_the_backlog_stays_full() {
    let dir = std::env::temp_dir().join(format!("daffi-drv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("full.sock");
    let _listener = sys::listen_unix(&path).unwrap(); // never accepts
    let mut held = Vec::new();
    let started = Instant::now();
    let err = loop {
        match sys::connect_unix(&path, Duration::from_millis(200)) {
            Ok(fd) => held.push(fd),
            Err(e) => break e,
        }
        assert!(held.len() < 100_000, "the backlog never filled");
    };
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(held);
    let _ = std::fs::remove_file(&path);
}

/// More operations than the submission queue has room for, submitted without waiting in
/// between, all complete: a full queue is handed to the kernel, and completions it could not
/// post are reaped and kept for `wait` instead of stalling the submitter.
#[test]
fn bursts_larger_than_the_queue_all_complete() {
    const BURST: u64 = 5000;
    for mut d in drivers() {
        let mut pending = Vec::new();
        let (_l, server, mut client) = pair(&mut d, &mut pending);
        let reader = std::thread::spawn(move || {
            let mut got = 0;
            let mut buf = [0u8; 4096];
            while got < BURST as usize {
                got += client.read(&mut buf).unwrap();
            }
            got
        });
        for i in 0..BURST {
            d.submit(
                100 + i,
                Op::Send {
                    zero_copy: false,
                    fd: server.as_raw_fd(),
                    bufs: vec![Bytes::from_static(b"x")],
                    skip: 0,
                },
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sent = 0;
        while sent < BURST {
            assert!(
                Instant::now() < deadline,
                "{}: {sent} of {BURST} sends completed",
                d.name()
            );
            d.wait(&mut pending, Some(Duration::from_millis(100)))
                .unwrap();
            for c in pending.drain(..) {
                if let Outcome::Sent { res, .. } = c.outcome {
                    assert_eq!(res.unwrap(), 1);
                    sent += 1;
                }
            }
        }
        assert_eq!(reader.join().unwrap(), BURST as usize, "{}", d.name());
    }
}

/// Pooled receives (io_uring's provided buffers): every byte arrives once and in order through
/// buffers that go back to the pool, across more data than the pool holds at once; a cancel
/// ends the operation; end of stream ends it too.
#[test]
fn pooled_receives_deliver_everything_in_order() {
    for mut d in drivers() {
        if !d.pooled_recv() {
            // The poll backend refuses the operation with a completion, never a panic.
            let mut pending = Vec::new();
            d.submit(9, Op::RecvPooled { fd: 0 });
            let c = wait_for(&mut d, &mut pending, 9);
            assert!(matches!(
                c.outcome,
                Outcome::Pooled {
                    res: Err(_),
                    more: false,
                    ..
                }
            ));
            continue;
        }
        let mut pending = Vec::new();
        let (_listener, server, mut client) = pair(&mut d, &mut pending);
        let fd = server.as_raw_fd();
        // 8 MiB in 64 KiB writes from another thread: far more than the pool's buffers.
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = std::thread::spawn(move || {
            for piece in data.chunks(64 << 10) {
                client.write_all(piece).unwrap();
            }
            client
        });
        let mut got = Vec::with_capacity(expected.len());
        let mut armed = false;
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < expected.len() {
            assert!(
                Instant::now() < deadline,
                "{}: stalled at {}",
                d.name(),
                got.len()
            );
            if !armed {
                d.submit(2, Op::RecvPooled { fd });
                armed = true;
            }
            d.wait(&mut pending, Some(Duration::from_millis(100)))
                .unwrap();
            for c in pending.drain(..) {
                let Outcome::Pooled { buf, res, more } = c.outcome else {
                    panic!("{}: not a pooled receive", d.name())
                };
                if let Some(b) = buf {
                    assert_eq!(res.as_ref().ok(), Some(&b.as_slice().len()));
                    got.extend_from_slice(b.as_slice());
                    d.recycle(b);
                }
                if !more {
                    // Out of buffers (ENOBUFS), or a full completion queue (its last
                    // completion then carries data), ends it: start again.
                    match &res {
                        Err(e) => assert!(daffi_driver::pooled_restart(e), "{}: {e}", d.name()),
                        Ok(n) => assert!(*n > 0, "{}: early end of stream", d.name()),
                    }
                    armed = false;
                }
            }
        }
        assert!(got == expected, "{}: bytes differ", d.name());
        let mut client = writer.join().unwrap();
        if !armed {
            d.submit(2, Op::RecvPooled { fd });
        }
        // A cancel ends the operation with its last completion.
        d.cancel_recv(2, fd);
        let c = wait_for(&mut d, &mut pending, 2);
        let Outcome::Pooled {
            res: Err(e),
            more: false,
            ..
        } = c.outcome
        else {
            panic!("{}: the cancel did not end the receive", d.name())
        };
        assert!(daffi_driver::pooled_restart(&e));
        // Started again, it sees new bytes, then the end of the stream.
        d.submit(2, Op::RecvPooled { fd });
        client.write_all(b"tail").unwrap();
        drop(client);
        let mut tail = Vec::new();
        loop {
            let c = wait_for(&mut d, &mut pending, 2);
            let Outcome::Pooled { buf, res, more } = c.outcome else {
                panic!("not a pooled receive")
            };
            if let Some(b) = buf {
                tail.extend_from_slice(b.as_slice());
                d.recycle(b);
            }
            if !more {
                assert_eq!(res.unwrap(), 0, "{}: not an end of stream", d.name());
                break;
            }
        }
        assert_eq!(tail, b"tail");
    }
}

#[cfg(target_os = "linux")]
#[test]
fn splice_passes_a_stream_through_a_pipe_in_order() {
    const TOTAL: usize = 12 << 20;
    for mut d in drivers() {
        assert!(
            d.splice(),
            "{}: splice should be available on Linux",
            d.name()
        );
        let mut pending = Vec::new();
        let (l1, from, mut writer) = pair(&mut d, &mut pending);
        let (l2, to, mut reader) = pair(&mut d, &mut pending);
        let pipe = Arc::new(sys::Pipe::new(1 << 20).unwrap());
        let expected: Vec<u8> = (0..TOTAL).map(|i| (i * 7 % 251) as u8).collect();
        let sent = expected.clone();
        let w = std::thread::spawn(move || {
            // Late and in bursts: the first splice in waits for the socket to be readable.
            std::thread::sleep(Duration::from_millis(50));
            for part in sent.chunks(300_000) {
                writer.write_all(part).unwrap();
            }
        });
        let r = std::thread::spawn(move || {
            // Slow to start: splices out fill the socket and wait for it to be writable.
            std::thread::sleep(Duration::from_millis(100));
            let mut got = Vec::new();
            reader.read_to_end(&mut got).unwrap();
            got
        });
        let (mut moved, mut false_full) = (0, 0);
        while moved < TOTAL {
            let fill = Op::SpliceIn {
                fd: from.as_raw_fd(),
                pipe: pipe.clone(),
                len: pipe.capacity(),
            };
            let res = splice(&mut d, &mut pending, 7, fill);
            // Bytes that arrived between the splice finding none and the check for them read
            // as a full pipe: the pipe is empty here, so simply go again (a few times at most).
            let mut n = match res {
                Err(e) if daffi_driver::pipe_full(&e) => {
                    false_full += 1;
                    assert!(
                        false_full < 100,
                        "{}: an empty pipe keeps reading full",
                        d.name()
                    );
                    continue;
                }
                r => r.unwrap(),
            };
            assert!(n > 0, "{}: end of stream after {moved} bytes", d.name());
            moved += n;
            while n > 0 {
                let drain = Op::SpliceOut {
                    fd: to.as_raw_fd(),
                    pipe: pipe.clone(),
                    len: n,
                };
                let m = splice(&mut d, &mut pending, 8, drain).unwrap();
                assert!(m > 0 && m <= n, "{}: spliced out {m} of {n}", d.name());
                n -= m;
            }
        }
        w.join().unwrap();
        // End of stream from the writer reaches the splice in as 0.
        let fill = Op::SpliceIn {
            fd: from.as_raw_fd(),
            pipe: pipe.clone(),
            len: pipe.capacity(),
        };
        let end = splice(&mut d, &mut pending, 7, fill).unwrap();
        assert_eq!(end, 0, "{}: end of stream", d.name());
        sys::shutdown(to.as_raw_fd());
        assert!(
            r.join().unwrap() == expected,
            "{}: spliced bytes differ",
            d.name()
        );
        for fd in [from, to, l1, l2] {
            d.close(fd);
        }
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_waiting_splice_in_can_be_cancelled() {
    for mut d in drivers() {
        let mut pending = Vec::new();
        let (listener, server, _client) = pair(&mut d, &mut pending);
        let pipe = Arc::new(sys::Pipe::new(1 << 16).unwrap());
        d.submit(
            9,
            Op::SpliceIn {
                fd: server.as_raw_fd(),
                pipe,
                len: 1 << 16,
            },
        );
        d.wait(&mut pending, Some(Duration::from_millis(20)))
            .unwrap();
        assert!(
            pending.iter().all(|c| c.token != 9),
            "{}: a splice in with nothing to read completed",
            d.name()
        );
        d.cancel_recv(9, server.as_raw_fd());
        let Outcome::Spliced { res, .. } = wait_for(&mut d, &mut pending, 9).outcome else {
            panic!("not a splice")
        };
        let e = res.unwrap_err();
        assert!(daffi_driver::cancelled(&e), "{}: {e}", d.name());
        d.close(server);
        d.close(listener);
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_splice_into_a_full_pipe_says_so_at_once() {
    for mut d in drivers() {
        let mut pending = Vec::new();
        let (listener, server, mut client) = pair(&mut d, &mut pending);
        let (l2, to, mut reader) = pair(&mut d, &mut pending);
        // The smallest pipe the system gives, and many times what it holds waiting.
        let pipe = Arc::new(sys::Pipe::new(1).unwrap());
        let total = 8 * pipe.capacity();
        client.write_all(&vec![5u8; total]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let splice_in = |d: &mut AnyDriver, pending: &mut Vec<Completion>| {
            let fill = Op::SpliceIn {
                fd: server.as_raw_fd(),
                pipe: pipe.clone(),
                len: total,
            };
            splice(d, pending, 10, fill)
        };
        // Splices in until the pipe says it is full, which happens at once, not after a wait.
        let mut n = 0;
        let e = loop {
            match splice_in(&mut d, &mut pending) {
                Ok(k) => {
                    assert!(k > 0, "{}: end of stream", d.name());
                    n += k;
                }
                Err(e) => break e,
            }
        };
        assert!(daffi_driver::pipe_full(&e), "{}: {e}", d.name());
        assert!(
            n > 0 && n < total,
            "{}: {n} of {total} bytes in the pipe",
            d.name()
        );
        let drain = Op::SpliceOut {
            fd: to.as_raw_fd(),
            pipe: pipe.clone(),
            len: n,
        };
        assert_eq!(splice(&mut d, &mut pending, 11, drain).unwrap(), n);
        let mut got = vec![0u8; n];
        reader.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|b| *b == 5));
        assert!(splice_in(&mut d, &mut pending).unwrap() > 0, "{}", d.name());
        for fd in [server, to, listener, l2] {
            d.close(fd);
        }
    }
}

#[test]
fn a_send_can_be_capped_in_bytes() {
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let bufs: Vec<Bytes> = (0..3u8).map(|i| Bytes::from(vec![i; 1000])).collect();
    // From byte 500 (in the first buffer), at most 1200 bytes: across a buffer boundary.
    let n = sys::send_at_most(a.as_raw_fd(), &bufs, 500, 1200).unwrap();
    assert_eq!(n, 1200);
    let mut got = vec![0u8; n];
    b.read_exact(&mut got).unwrap();
    let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
    assert_eq!(got, all[500..1700]);
    // Uncapped: the rest.
    assert_eq!(sys::send(a.as_raw_fd(), &bufs, 1700).unwrap(), 1300);
}
