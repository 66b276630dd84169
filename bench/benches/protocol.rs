//! Protocol micro-benchmarks: hub message decode (serde_json beside simd-json, and
//! MessagePack), encode-once of a group message, and WebSocket frame decoding.

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringhub_bench::*;
use ringhub_protocol::frame;
use ringhub_protocol::hub::{json, msgpack, HubProtocol};
use ringhub_protocol::ws::{FrameDecoder, WsLimits};

fn decode(c: &mut Criterion) {
    let message = typical_client_invocation();
    let json_body = record_body(HubProtocol::Json, &message);
    let msgpack_body = record_body(HubProtocol::MessagePack, &message);
    let mut group = c.benchmark_group("decode_invocation");
    group.throughput(Throughput::Elements(1));
    group.bench_function("json_serde_json", |b| {
        b.iter(|| json::parse(black_box(&json_body)).unwrap())
    });
    // simd-json parses in place, so each run starts from a fresh copy, as a server
    // would hand it a region of its read buffer; the copy (~170 bytes) is measured too.
    let mut scratch = json_body.clone();
    group.bench_function("json_simd_json", |b| {
        b.iter(|| {
            scratch.copy_from_slice(&json_body);
            json::parse_simd(black_box(&mut scratch)).unwrap()
        })
    });
    group.bench_function("messagepack", |b| {
        b.iter(|| msgpack::parse(black_box(&msgpack_body)).unwrap())
    });
    group.finish();
}

fn encode_once(c: &mut Criterion) {
    let message = typical_group_message();
    let mut group = c.benchmark_group("encode_once_64b_group_message");
    group.throughput(Throughput::Elements(1));
    for protocol in [HubProtocol::Json, HubProtocol::MessagePack] {
        group.bench_function(protocol.name(), |b| {
            b.iter(|| frame::encode_message(protocol, black_box(&message)))
        });
    }
    group.finish();
}

fn ws_frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("ws_decode_masked_frames");
    for payload_len in [16usize, 128] {
        let stream = masked_frame_stream(4096, payload_len);
        group.throughput(Throughput::Bytes(stream.len() as u64));
        group.bench_function(format!("{payload_len}B_payloads"), |b| {
            b.iter(|| {
                let mut decoder = FrameDecoder::new(WsLimits::default());
                let mut buf = BytesMut::from(&stream[..]);
                let mut frames = 0usize;
                while let Some(event) = decoder.decode(&mut buf).unwrap() {
                    black_box(event);
                    frames += 1;
                }
                assert_eq!(frames, 4096);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode_once, ws_frames);
criterion_main!(benches);
