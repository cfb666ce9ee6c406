//! Frame codec: encoding heads and parsing streams of small and large frames.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use daffi_proto::frame::{Kind, encode_head};
use daffi_proto::reader::{FrameReader, Item};

fn stream_of(count: usize, payload: usize) -> Vec<u8> {
    let body = vec![0x5au8; payload];
    let mut s = Vec::new();
    for i in 0..count {
        s.extend_from_slice(&encode_head(
            Kind::Request,
            i as u64,
            2,
            0,
            "echo",
            payload as u64,
        ));
        s.extend_from_slice(&body);
    }
    s
}

fn parse(reader: &mut FrameReader, stream: &[u8]) -> usize {
    let mut frames = 0;
    let mut at = 0;
    while at < stream.len() {
        let mut t = reader.target();
        let n = t.max.min(stream.len() - at);
        t.buf.extend_from_slice(&stream[at..at + n]);
        at += n;
        reader.filled(t.buf);
        while let Ok(Some(Item::Frame(_))) = reader.next_item() {
            frames += 1;
        }
    }
    frames
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.bench_function("encode_head", |b| {
        b.iter(|| {
            encode_head(
                Kind::Request,
                42,
                2,
                0,
                std::hint::black_box("function_name"),
                1500,
            )
        })
    });
    for (count, size) in [(1000usize, 1500usize), (4, 8 << 20)] {
        let stream = stream_of(count, size);
        g.throughput(Throughput::Bytes(stream.len() as u64));
        g.bench_function(format!("parse_{count}x{size}"), |b| {
            b.iter(|| {
                let mut r = FrameReader::new(1 << 30);
                assert_eq!(parse(&mut r, &stream), count);
            })
        });
    }
    let payload = Bytes::from(vec![1u8; 1500]);
    g.bench_function("hello_encode", |b| {
        b.iter(|| {
            daffi_proto::Hello {
                max_message_size: 1 << 30,
                functions: vec!["a".into(), "b".into()],
                token: Vec::new(),
            }
            .encode()
            .len()
                + payload.len()
        })
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
