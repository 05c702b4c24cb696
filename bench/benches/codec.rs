//! The hot paths of the protocol: decoding a request header, encoding reply headers, and a
//! whole READ through the sans-IO connection (decode, dispatch, reply, drain).

use std::time::Instant;

use blocksmith_bench::{connected, drain_output, feed, request};
use blocksmith_core::conn::{Event, Op, Outcome};
use blocksmith_core::proto::*;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

fn codec(c: &mut Criterion) {
    let hdr = request(CMD_READ, 0, 7, 4096, 4096);
    let mut compact = [0u8; COMPACT_REQUEST_LEN];
    compact.copy_from_slice(&hdr);
    c.bench_function("decode_compact_request", |b| b.iter(|| decode_compact_request(black_box(&compact))));
    let mut out = Vec::with_capacity(64);
    c.bench_function("encode_simple_reply", |b| {
        b.iter(|| {
            out.clear();
            encode_simple_reply(&mut out, 0, black_box(7));
        })
    });
    c.bench_function("encode_offset_data_header", |b| {
        b.iter(|| {
            out.clear();
            encode_offset_data_header(
                &mut out,
                ReplyForm::Structured,
                REPLY_FLAG_DONE,
                black_box(7),
                4096,
                4096,
                4096,
            );
        })
    });
    let extents: Vec<(u32, u32)> = (0..64).map(|i| (4096, (i % 2) as u32)).collect();
    let mut big = Vec::with_capacity(1024);
    c.bench_function("encode_block_status_64", |b| {
        b.iter(|| {
            big.clear();
            encode_block_status(&mut big, REPLY_FLAG_DONE, 7, 1, black_box(&extents));
        })
    });
}

/// One 4 KiB READ through the connection: header in, request out, data back, reply bytes out.
fn conn_read(c: &mut Criterion, structured: bool) {
    let mut conn = connected(structured);
    let now = Instant::now();
    let hdr = request(CMD_READ, 0, 1, 0, 4096);
    let mut sink = Vec::with_capacity(1 << 16);
    let mut data = Some(vec![0x5au8; 4096]);
    let name = if structured { "conn_read_4k_structured" } else { "conn_read_4k_simple" };
    let mut g = c.benchmark_group("conn");
    g.throughput(Throughput::Elements(1));
    g.bench_function(name, |b| {
        b.iter(|| {
            feed(&mut conn, &hdr, now);
            let Some(Event::Request(req)) = conn.poll_event() else { panic!("no request") };
            let Op::Read { count } = req.op else { panic!("not a read") };
            // Reuse one data buffer, as a pool would.
            let d = data.take().unwrap_or_else(|| vec![0x5au8; count]);
            conn.handle_result(req.id, Ok(Outcome::Data(d)));
            sink.clear();
            drain_output(&mut conn, &mut sink);
        })
    });
    g.finish();
}

/// A FLUSH: the smallest request, so this is the fixed cost of a request through `Conn`.
fn conn_flush(c: &mut Criterion) {
    let mut conn = connected(true);
    let now = Instant::now();
    let hdr = request(CMD_FLUSH, 0, 1, 0, 0);
    let mut sink = Vec::new();
    c.bench_function("conn_flush", |b| {
        b.iter(|| {
            feed(&mut conn, &hdr, now);
            let Some(Event::Request(req)) = conn.poll_event() else { panic!("no request") };
            conn.handle_result(req.id, Ok(Outcome::Done));
            sink.clear();
            drain_output(&mut conn, &mut sink);
        })
    });
}

fn conn_reads(c: &mut Criterion) {
    conn_read(c, false);
    conn_read(c, true);
}

criterion_group!(benches, codec, conn_reads, conn_flush);
criterion_main!(benches);
