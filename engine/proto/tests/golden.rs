//! The golden frames of `testdata/`, decoded with this crate's public API.
//!
//! `testdata/make_golden.py` writes them with Python's `struct` from the layout in
//! `docs/protocol.md`, not with this crate's encoder, so these tests check the decoder against
//! the document, and then the encoder against the same bytes. `python/tests/test_golden.py`
//! parses the same files on the Python side.

use bytes::Bytes;
use daffi_proto::frame::{encode_head, error_code};
use daffi_proto::handshake::{decode_names, decode_peers, encode_names, encode_peers};
use daffi_proto::reader::Item;
use daffi_proto::{
    Connection, DEFAULT_MAX_MESSAGE_SIZE, DecodeError, Event, Flags, Frame, FrameReader,
    HEADER_LEN, Header, Hello, Kind, Local, MAGIC, Payload, Peer, Role, VERSION,
};

const HELLO: &[u8] = include_bytes!("../testdata/hello.bin");
const WELCOME: &[u8] = include_bytes!("../testdata/welcome.bin");
const REQUEST_PICKLE: &[u8] = include_bytes!("../testdata/request_pickle.bin");
const RESPONSE_PICKLE: &[u8] = include_bytes!("../testdata/response_pickle.bin");
const RESPONSE_TEXT: &[u8] = include_bytes!("../testdata/response_text.bin");
const ERROR_REMOTE: &[u8] = include_bytes!("../testdata/error_remote.bin");
const ANNOUNCE: &[u8] = include_bytes!("../testdata/announce.bin");
const GOODBYE: &[u8] = include_bytes!("../testdata/goodbye.bin");
const WELCOME_ROUTER: &[u8] = include_bytes!("../testdata/welcome_router.bin");
const JOINED: &[u8] = include_bytes!("../testdata/joined.bin");
const LEFT: &[u8] = include_bytes!("../testdata/left.bin");
const REQUEST_ROUTED: &[u8] = include_bytes!("../testdata/request_routed.bin");
const RESPONSE_TRAILER: &[u8] = include_bytes!("../testdata/response_trailer.bin");

const ALL: [&[u8]; 13] = [
    HELLO,
    WELCOME,
    REQUEST_PICKLE,
    RESPONSE_PICKLE,
    RESPONSE_TEXT,
    ERROR_REMOTE,
    ANNOUNCE,
    GOODBYE,
    WELCOME_ROUTER,
    JOINED,
    LEFT,
    REQUEST_ROUTED,
    RESPONSE_TRAILER,
];

/// `pickle.dumps(((1, 2), {}), protocol=5)`.
const PICKLE_ADD_ARGS: &[u8] =
    b"\x80\x05\x95\x0b\x00\x00\x00\x00\x00\x00\x00K\x01K\x02\x86\x94}\x94\x86\x94.";
/// `pickle.dumps(3, protocol=5)`.
const PICKLE_THREE: &[u8] = b"\x80\x05K\x03.";
const REMOTE_ERROR_JSON: &str = concat!(
    r#"{"type":"ValueError","message":"n must be positive","traceback":"#,
    r#""Traceback (most recent call last):\n  File \"svc.py\", line 9, in sqrt\n"#,
    r#"ValueError: n must be positive\n"}"#,
);
const GIB: u64 = 1 << 30;

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Decodes the fixed header of a golden file and checks the bytes the decoder does not return.
fn header(bytes: &[u8]) -> Header {
    let raw: &[u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().expect("32 bytes");
    assert_eq!(raw[0..2], MAGIC);
    assert_eq!(raw[2], VERSION);
    assert_eq!(raw[6..8], [0, 0], "reserved bytes 6..8");
    assert_eq!(raw[20..24], [0; 4], "reserved bytes 20..24");
    let h = Header::decode(raw).expect("a valid header");
    assert_eq!(
        bytes.len() as u64,
        HEADER_LEN as u64 + h.body_len() + u64::from(h.flags.trailer()),
        "the file is exactly one frame"
    );
    h
}

/// Reads one golden file with a [`FrameReader`]: exactly one frame, nothing left over.
fn read_one(bytes: &[u8]) -> Frame {
    let mut reader = FrameReader::new(DEFAULT_MAX_MESSAGE_SIZE);
    let mut target = reader.target();
    assert!(bytes.len() <= target.max);
    target.buf.extend_from_slice(bytes);
    reader.filled(target.buf);
    let item = reader.next_item().expect("a valid frame");
    assert_eq!(reader.next_item(), Ok(None));
    assert!(reader.is_idle());
    match item {
        Some(Item::Frame(f)) => {
            assert_eq!(f.header, header(bytes));
            f
        }
        other => panic!("expected a whole frame, got {other:?}"),
    }
}

/// The crate's encoder writes the same header and meta as the golden file.
fn assert_head_encodes(bytes: &[u8], f: &Frame) {
    let h = f.header;
    let head = encode_head(
        h.kind,
        h.call_id,
        h.serde,
        h.flags.0,
        &f.meta,
        h.payload_len,
    );
    assert_eq!(&head[..], &bytes[..HEADER_LEN + h.meta_len as usize]);
}

fn inline(f: &Frame) -> &[u8] {
    match &f.payload {
        Payload::Inline(v) => v,
        Payload::External(n) => panic!("small payload received externally ({n} bytes)"),
    }
}

#[test]
fn hello() {
    let f = read_one(HELLO);
    assert_eq!(
        f.header,
        Header {
            kind: Kind::Hello,
            serde: 0,
            flags: Flags(0),
            call_id: 0,
            meta_len: 3,
            payload_len: 23,
        }
    );
    assert_eq!(f.meta, "cli");
    let hello = Hello::decode(inline(&f)).unwrap();
    assert_eq!(
        hello,
        Hello {
            max_message_size: GIB,
            functions: strings(&["add", "echo"]),
            token: Vec::new(),
        }
    );
    assert_eq!(&hello.encode()[..], inline(&f));
    assert_eq!(decode_names(&inline(&f)[8..]).unwrap(), ["add", "echo"]);
    assert_head_encodes(HELLO, &f);
}

#[test]
fn welcome() {
    let f = read_one(WELCOME);
    assert_eq!(
        f.header,
        Header {
            kind: Kind::Welcome,
            serde: 0,
            flags: Flags(0),
            call_id: 0,
            meta_len: 3,
            payload_len: 31,
        }
    );
    assert_eq!(f.meta, "svc");
    let hello = Hello::decode(inline(&f)).unwrap();
    assert_eq!(
        hello,
        Hello {
            max_message_size: 5 * GIB,
            functions: strings(&["add", "echo", "grüß"]),
            token: Vec::new(),
        }
    );
    assert_eq!(&hello.encode()[..], inline(&f));
    assert_head_encodes(WELCOME, &f);
}

#[test]
fn request_pickle() {
    let f = read_one(REQUEST_PICKLE);
    assert_eq!(
        f.header,
        Header {
            kind: Kind::Request,
            serde: 2,
            flags: Flags(0),
            call_id: 258,
            meta_len: 3,
            payload_len: PICKLE_ADD_ARGS.len() as u64,
        }
    );
    assert!(!f.header.flags.no_reply() && !f.header.flags.text());
    assert_eq!(f.meta, "add");
    assert_eq!(inline(&f), PICKLE_ADD_ARGS);
    assert_head_encodes(REQUEST_PICKLE, &f);
}

#[test]
fn response_pickle() {
    let f = read_one(RESPONSE_PICKLE);
    assert_eq!(
        f.header,
        Header {
            kind: Kind::Response,
            serde: 2,
            flags: Flags(0),
            call_id: 258,
            meta_len: 0,
            payload_len: 5,
        }
    );
    assert_eq!(f.meta, "");
    assert_eq!(inline(&f), PICKLE_THREE);
    assert_head_encodes(RESPONSE_PICKLE, &f);
}

#[test]
fn response_text() {
    let f = read_one(RESPONSE_TEXT);
    assert_eq!(
        f.header,
        Header {
            kind: Kind::Response,
            serde: 0,
            flags: Flags(Flags::TEXT),
            call_id: 259,
            meta_len: 0,
            payload_len: 6,
        }
    );
    assert!(f.header.flags.text() && !f.header.flags.no_reply());
    assert_eq!(f.meta, "");
    assert_eq!(std::str::from_utf8(inline(&f)), Ok("héllo"));
    assert_head_encodes(RESPONSE_TEXT, &f);
}

#[test]
fn error_remote() {
    let f = read_one(ERROR_REMOTE);
    assert_eq!(
        f.header,
        Header {
            kind: Kind::Error,
            serde: 0,
            flags: Flags(0),
            call_id: 260,
            meta_len: 6,
            payload_len: REMOTE_ERROR_JSON.len() as u64,
        }
    );
    assert_eq!(f.meta, error_code::REMOTE);
    assert_eq!(inline(&f), REMOTE_ERROR_JSON.as_bytes());
    assert_head_encodes(ERROR_REMOTE, &f);
}

#[test]
fn announce() {
    let f = read_one(ANNOUNCE);
    assert_eq!(
        f.header,
        Header {
            kind: Kind::Announce,
            serde: 0,
            flags: Flags(0),
            call_id: 0,
            meta_len: 0,
            payload_len: 18,
        }
    );
    assert_eq!(f.meta, "");
    let names = decode_names(inline(&f)).unwrap();
    assert_eq!(names, ["late", "grüß"]);
    assert_eq!(&encode_names(&names)[..], inline(&f));
    assert_head_encodes(ANNOUNCE, &f);
}

#[test]
fn goodbye() {
    let f = read_one(GOODBYE);
    assert_eq!(
        f.header,
        Header {
            kind: Kind::Goodbye,
            serde: 0,
            flags: Flags(0),
            call_id: 0,
            meta_len: 52,
            payload_len: 0,
        }
    );
    assert_eq!(f.payload, Payload::Inline(Vec::new()));
    // The reason is what the runtime says to a stranger whose first bytes are "GE".
    let mut reader = FrameReader::new(DEFAULT_MAX_MESSAGE_SIZE);
    let mut target = reader.target();
    target.buf.extend_from_slice(b"GE");
    reader.filled(target.buf);
    let e: DecodeError = reader.next_item().unwrap_err();
    assert_eq!(f.meta, format!("protocol error: {e}"));
    assert_head_encodes(GOODBYE, &f);
}

/// A stranger is refused on its first byte, without waiting for a whole header.
#[test]
fn stranger_is_refused_at_once() {
    let mut reader = FrameReader::new(DEFAULT_MAX_MESSAGE_SIZE);
    let mut target = reader.target();
    target.buf.push(b'G');
    reader.filled(target.buf);
    assert!(matches!(reader.next_item(), Err(DecodeError::Header(_))));
    // A daffi peer's first bytes, however few, are waited on.
    for n in 0..HEADER_LEN {
        let mut reader = FrameReader::new(DEFAULT_MAX_MESSAGE_SIZE);
        let mut target = reader.target();
        target.buf.extend_from_slice(&HELLO[..n]);
        reader.filled(target.buf);
        assert_eq!(reader.next_item(), Ok(None), "{n} bytes");
    }
}

/// All golden frames back to back, received in pieces of any size, give the same frames.
#[test]
fn stream_of_golden_frames_at_any_boundary() {
    let stream: Vec<u8> = ALL.concat();
    let expected: Vec<Frame> = ALL.iter().copied().map(read_one).collect();
    for step in [1, 2, 7, 31, 32, 33, 100, stream.len()] {
        let mut reader = FrameReader::new(DEFAULT_MAX_MESSAGE_SIZE);
        let mut frames = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            let mut target = reader.target();
            let n = target.max.min(step).min(stream.len() - at);
            target.buf.extend_from_slice(&stream[at..at + n]);
            at += n;
            reader.filled(target.buf);
            while let Some(item) = reader.next_item().unwrap() {
                match item {
                    Item::Frame(f) => frames.push(f),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(frames, expected, "step {step}");
        assert!(reader.is_idle());
    }
}

fn transmit(c: &mut Connection) -> Vec<u8> {
    let mut bufs: Vec<Bytes> = Vec::new();
    while c.poll_transmit(&mut bufs, 16) > 0 {}
    bufs.concat()
}

fn receive(c: &mut Connection, bytes: &[u8]) -> Vec<Event> {
    let mut target = c.recv_target();
    target.buf.extend_from_slice(bytes);
    c.recv_done(target.buf).expect("valid frames");
    std::iter::from_fn(|| c.poll_event()).collect()
}

/// A client [`Connection`] writes exactly the golden bytes and understands the server's.
#[test]
fn client_connection_speaks_the_golden_bytes() {
    let mut client = Connection::new(
        Role::Client,
        Local {
            name: "cli".into(),
            functions: strings(&["add", "echo"]),
            max_message_size: GIB,
            token: Vec::new(),
            router: false,
        },
    );
    assert_eq!(transmit(&mut client), HELLO);
    assert_eq!(
        receive(&mut client, WELCOME),
        [Event::Open(Peer {
            name: "svc".into(),
            functions: strings(&["add", "echo", "grüß"]),
            max_message_size: 5 * GIB,
            router: false,
        })]
    );
    client
        .request(258, "add", 2, 0, Bytes::from_static(PICKLE_ADD_ARGS))
        .unwrap();
    assert_eq!(transmit(&mut client), REQUEST_PICKLE);
    client.announce(&strings(&["late", "grüß"]));
    assert_eq!(transmit(&mut client), ANNOUNCE);
    client.goodbye("protocol error: bad magic [47, 45]: not a daffi peer");
    assert_eq!(transmit(&mut client), GOODBYE);

    let events = receive(
        &mut client,
        &[
            RESPONSE_PICKLE,
            RESPONSE_TEXT,
            ERROR_REMOTE,
            ANNOUNCE,
            GOODBYE,
        ]
        .concat(),
    );
    assert_eq!(
        events,
        [
            Event::Response {
                call_id: 258,
                serde: 2,
                flags: Flags(0),
                payload: Payload::Inline(PICKLE_THREE.to_vec()),
            },
            Event::Response {
                call_id: 259,
                serde: 0,
                flags: Flags(Flags::TEXT),
                payload: Payload::Inline("héllo".as_bytes().to_vec()),
            },
            Event::Error {
                call_id: 260,
                code: error_code::REMOTE.into(),
                payload: Payload::Inline(REMOTE_ERROR_JSON.as_bytes().to_vec()),
            },
            Event::Announce(strings(&["late", "grüß"])),
            Event::Goodbye("protocol error: bad magic [47, 45]: not a daffi peer".into()),
        ]
    );
    // An announced name the peer already had is not listed twice.
    assert_eq!(
        client.peer().unwrap().functions,
        ["add", "echo", "grüß", "late"]
    );
}

/// A server [`Connection`] answers the golden hello with exactly the golden welcome, and its
/// answers are the golden responses and error.
#[test]
fn server_connection_speaks_the_golden_bytes() {
    let mut server = Connection::new(
        Role::Server,
        Local {
            name: "svc".into(),
            functions: strings(&["add", "echo", "grüß"]),
            max_message_size: 5 * GIB,
            token: Vec::new(),
            router: false,
        },
    );
    assert_eq!(transmit(&mut server), b"");
    assert_eq!(
        receive(&mut server, HELLO),
        [Event::Open(Peer {
            name: "cli".into(),
            functions: strings(&["add", "echo"]),
            max_message_size: GIB,
            router: false,
        })]
    );
    assert_eq!(transmit(&mut server), WELCOME);
    assert_eq!(
        receive(&mut server, REQUEST_PICKLE),
        [Event::Request {
            call_id: 258,
            peer: None,
            name: "add".into(),
            serde: 2,
            flags: Flags(0),
            payload: Payload::Inline(PICKLE_ADD_ARGS.to_vec()),
        }]
    );
    server
        .respond(258, 2, 0, Bytes::from_static(PICKLE_THREE))
        .unwrap();
    assert_eq!(transmit(&mut server), RESPONSE_PICKLE);
    server
        .respond(259, 0, Flags::TEXT, Bytes::from("héllo"))
        .unwrap();
    assert_eq!(transmit(&mut server), RESPONSE_TEXT);
    server.send_error(
        260,
        error_code::REMOTE,
        Bytes::from_static(REMOTE_ERROR_JSON.as_bytes()),
    );
    assert_eq!(transmit(&mut server), ERROR_REMOTE);
}

/// Frames other than hello before the handshake, and a second hello after it, are protocol
/// errors.
#[test]
fn handshake_order_is_enforced() {
    let local = Local {
        name: "svc".into(),
        functions: Vec::new(),
        max_message_size: GIB,
        token: Vec::new(),
        router: false,
    };
    for early in [
        WELCOME,
        REQUEST_PICKLE,
        RESPONSE_PICKLE,
        ERROR_REMOTE,
        ANNOUNCE,
    ] {
        let mut server = Connection::new(Role::Server, local.clone());
        let mut target = server.recv_target();
        target.buf.extend_from_slice(early);
        assert!(matches!(
            server.recv_done(target.buf),
            Err(DecodeError::Unexpected(_, "before the handshake"))
        ));
    }
    let mut server = Connection::new(Role::Server, local);
    let mut target = server.recv_target();
    target.buf.extend_from_slice(&[HELLO, HELLO].concat());
    assert!(matches!(
        server.recv_done(target.buf),
        Err(DecodeError::Unexpected(Kind::Hello, "after the handshake"))
    ));
}

/// The Router's frames: a router `Connection` answers the golden hello with the golden routed
/// welcome, a client understands it and the membership frames, and a routed request names its
/// target.
#[test]
fn router_frames_speak_the_golden_bytes() {
    let mut router = Connection::new(
        Role::Server,
        Local {
            name: "rt".into(),
            functions: Vec::new(),
            max_message_size: GIB,
            token: Vec::new(),
            router: true,
        },
    );
    receive(&mut router, HELLO);
    assert_eq!(transmit(&mut router), WELCOME_ROUTER);
    let f = read_one(WELCOME_ROUTER);
    assert_eq!(f.header.flags, Flags(Flags::ROUTER));

    let peers = vec![
        Peer {
            name: "worker-1".into(),
            functions: strings(&["process"]),
            max_message_size: GIB,
            router: false,
        },
        Peer {
            name: "caller".into(),
            functions: Vec::new(),
            max_message_size: 1 << 20,
            router: false,
        },
    ];
    let joined = read_one(JOINED);
    assert_eq!(joined.header.kind, Kind::Joined);
    assert_eq!(decode_peers(inline(&joined)).unwrap(), peers);
    assert_eq!(&encode_peers(&peers)[..], inline(&joined));
    assert_head_encodes(JOINED, &joined);
    let left = read_one(LEFT);
    assert_eq!(
        (left.header.kind, left.meta.as_str()),
        (Kind::Left, "worker-1")
    );
    assert_head_encodes(LEFT, &left);

    let mut client = Connection::new(
        Role::Client,
        Local {
            name: "cli".into(),
            functions: strings(&["add", "echo"]),
            max_message_size: GIB,
            token: Vec::new(),
            router: false,
        },
    );
    assert_eq!(transmit(&mut client), HELLO);
    let ev = receive(&mut client, &[WELCOME_ROUTER, JOINED, LEFT].concat());
    assert_eq!(
        ev,
        [
            Event::Open(Peer {
                name: "rt".into(),
                functions: Vec::new(),
                max_message_size: GIB,
                router: true,
            }),
            Event::Joined(peers),
            Event::Left("worker-1".into()),
        ]
    );
    client.queue_frame(
        Kind::Request,
        7,
        1,
        0,
        "worker-1\0process",
        Bytes::from_static(b"[[\"job\"],{}]"),
    );
    assert_eq!(transmit(&mut client), REQUEST_ROUTED);
    assert_eq!(
        receive(&mut router, REQUEST_ROUTED),
        [Event::Request {
            call_id: 7,
            peer: Some("worker-1".into()),
            name: "process".into(),
            serde: 1,
            flags: Flags(0),
            payload: Payload::Inline(b"[[\"job\"],{}]".to_vec()),
        }]
    );
}

/// A relayed answer: the TRAILER flag, the payload, then a status byte the reader consumes;
/// a streamed `Connection` frame writes exactly these bytes.
#[test]
fn response_with_a_trailer() {
    let h = header(RESPONSE_TRAILER);
    assert_eq!(h.flags, Flags(Flags::TRAILER));
    assert_eq!(h.payload_len, 11);
    assert_eq!(RESPONSE_TRAILER.len(), HEADER_LEN + 11 + 1);
    assert_eq!(*RESPONSE_TRAILER.last().unwrap(), 0);
    let mut client = Connection::new(
        Role::Client,
        Local {
            name: "cli".into(),
            functions: Vec::new(),
            max_message_size: GIB,
            token: Vec::new(),
            router: false,
        },
    );
    transmit(&mut client);
    receive(&mut client, WELCOME_ROUTER);
    let ev = receive(&mut client, &[JOINED, RESPONSE_TRAILER].concat());
    assert_eq!(
        ev[1],
        Event::Response {
            call_id: 7,
            serde: 1,
            flags: Flags(0),
            payload: Payload::Inline(b"\"done: job\"".to_vec()),
        }
    );
    let mut router = Connection::new(
        Role::Server,
        Local {
            name: "rt".into(),
            functions: Vec::new(),
            max_message_size: GIB,
            token: Vec::new(),
            router: true,
        },
    );
    receive(&mut router, HELLO);
    transmit(&mut router);
    router.begin_stream(Kind::Response, 7, 1, 0, "", 11);
    router.stream_data(Bytes::from_static(b"\"done: "));
    router.stream_data(Bytes::from_static(b"job\""));
    router.end_stream();
    assert_eq!(transmit(&mut router), RESPONSE_TRAILER);
}
