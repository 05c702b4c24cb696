use super::*;

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

#[test]
fn greetings() {
    let mut v = Vec::new();
    encode_newstyle_greeting(&mut v, 3);
    assert_eq!(v, b"NBDMAGICIHAVEOPT\x00\x03");
    assert_eq!(v.len(), NEWSTYLE_GREETING_LEN);

    let mut v = Vec::new();
    encode_oldstyle_greeting(&mut v, 0x1122, 0x0001_0003);
    assert_eq!(v.len(), OLDSTYLE_GREETING_LEN);
    assert_eq!(&v[..8], b"NBDMAGIC");
    assert_eq!(&v[8..16], &[0, 0, 0x42, 0x02, 0x81, 0x86, 0x12, 0x53]);
    assert_eq!(&v[16..24], &0x1122u64.to_be_bytes());
    assert_eq!(&v[24..28], &[0, 1, 0, 3]);
    assert!(v[28..].iter().all(|&b| b == 0));

    let mut v = Vec::new();
    encode_export_name_reply(&mut v, 1 << 20, 0x0123, false);
    assert_eq!(v, [0, 0, 0, 0, 0, 0x10, 0, 0, 0x01, 0x23]);
    let mut v = Vec::new();
    encode_export_name_reply(&mut v, 1, 1, true);
    assert_eq!(v.len(), 10 + ZEROES_LEN);
}

#[test]
fn option_header_round_trip_and_bad_magic() {
    let mut v = Vec::new();
    encode_option_request(&mut v, OPT_GO, b"abc");
    assert_eq!(v.len(), 19);
    assert_eq!(decode_option_header(&arr(&v)), Ok(OptionHeader { code: 7, len: 3 }));
    v[0] = b'X';
    assert!(decode_option_header(&arr(&v)).is_err());
}

#[test]
fn option_replies_bytes() {
    let mut v = Vec::new();
    encode_rep_ack(&mut v, OPT_GO);
    assert_eq!(v, [0, 3, 0xe8, 0x89, 4, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]);
    assert_eq!(
        decode_option_reply_header(&arr(&v)),
        Ok(OptionReplyHeader { opt: 7, reply_type: REP_ACK, len: 0 })
    );

    let mut v = Vec::new();
    encode_info_export(&mut v, OPT_INFO, 4096, 0x0d);
    assert_eq!(&v[16..20], &12u32.to_be_bytes());
    assert_eq!(&v[20..], &[0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x0d]);

    let mut v = Vec::new();
    encode_info_block_size(&mut v, OPT_GO, 1, 4096, 1 << 25);
    assert_eq!(&v[16..20], &14u32.to_be_bytes());
    assert_eq!(&v[20..], &[0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 2, 0, 0, 0]);

    let mut v = Vec::new();
    encode_rep_server(&mut v, OPT_LIST, "disk", Some("a disk"));
    assert_eq!(&v[12..16], &REP_SERVER.to_be_bytes());
    assert_eq!(&v[16..20], &14u32.to_be_bytes());
    assert_eq!(&v[20..], b"\x00\x00\x00\x04diska disk");

    let mut v = Vec::new();
    encode_rep_meta_context(&mut v, OPT_SET_META_CONTEXT, 1, BASE_ALLOCATION);
    assert_eq!(&v[12..16], &REP_META_CONTEXT.to_be_bytes());
    assert_eq!(&v[16..20], &19u32.to_be_bytes());
    assert_eq!(&v[20..], b"\x00\x00\x00\x01base:allocation");

    let mut v = Vec::new();
    encode_info_string(&mut v, OPT_GO, INFO_NAME, "");
    assert_eq!(&v[16..], &[0, 0, 0, 2, 0, 1]);
}

#[test]
fn error_messages_are_cut_on_a_char_boundary() {
    let long = "é".repeat(3000); // 6000 bytes of two-byte characters
    let mut v = Vec::new();
    encode_rep_error(&mut v, OPT_GO, REP_ERR_UNKNOWN, &long);
    let len = u32::from_be_bytes(arr(&v[16..])) as usize;
    assert_eq!(len, 4096);
    assert!(std::str::from_utf8(&v[20..]).is_ok());
    assert_eq!(truncate_str("aé", 2), "a");
    assert_eq!(truncate_str("abc", 10), "abc");

    let mut v = Vec::new();
    encode_error_chunk(&mut v, ReplyForm::Structured, REPLY_FLAG_DONE, 9, 0, EIO, &long);
    let h = decode_structured_header(&arr(&v)).unwrap();
    assert_eq!(h.len, 6 + 4096);
    assert_eq!(&v[20..24], &EIO.to_be_bytes());
    assert_eq!(&v[24..26], &4096u16.to_be_bytes());
}

#[test]
fn request_headers() {
    let h = RequestHeader { flags: 0x0001, typ: CMD_WRITE, cookie: 0xdead_beef, offset: 512, length: 4096 };
    let mut v = Vec::new();
    encode_compact_request(&mut v, &h);
    assert_eq!(v.len(), COMPACT_REQUEST_LEN);
    assert_eq!(&v[..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(&v[4..8], &[0, 1, 0, 1]);
    assert_eq!(&v[24..28], &[0, 0, 0x10, 0]);
    assert_eq!(decode_compact_request(&arr(&v)), Ok(h));
    assert!(decode_extended_request(&arr(&[v.clone(), vec![0; 4]].concat())).is_err());

    let h = RequestHeader { length: 1 << 40, ..h };
    let mut v = Vec::new();
    encode_extended_request(&mut v, &h);
    assert_eq!(v.len(), EXTENDED_REQUEST_LEN);
    assert_eq!(&v[..4], &[0x21, 0xe4, 0x1c, 0x71]);
    assert_eq!(decode_extended_request(&arr(&v)), Ok(h));
    assert_eq!(decode_compact_request(&arr(&v)), Err(BadMagic(0x21e4_1c71)));
}

#[test]
fn reply_headers() {
    let mut v = Vec::new();
    encode_simple_reply(&mut v, EINVAL, 0x0102_0304_0506_0708);
    assert_eq!(v, [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(decode_simple_reply(&arr(&v)), Ok(SimpleReply { error: 22, cookie: 0x0102_0304_0506_0708 }));

    let mut v = Vec::new();
    encode_none_chunk(&mut v, ReplyForm::Structured, 5, 999);
    assert_eq!(v, [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0]);

    let mut v = Vec::new();
    encode_none_chunk(&mut v, ReplyForm::Extended, 5, 999);
    assert_eq!(v.len(), EXTENDED_REPLY_HEADER_LEN);
    assert_eq!(
        decode_extended_reply_header(&arr(&v)),
        Ok(ChunkHeader { flags: 1, typ: 0, cookie: 5, offset: 999, len: 0 })
    );

    let mut v = Vec::new();
    encode_offset_data_header(&mut v, ReplyForm::Extended, 0, 7, 4096, 8192, 100);
    let h = decode_extended_reply_header(&arr(&v)).unwrap();
    assert_eq!((h.typ, h.offset, h.len), (REPLY_TYPE_OFFSET_DATA, 4096, 108));
    assert_eq!(&v[32..], &8192u64.to_be_bytes());

    let mut v = Vec::new();
    encode_offset_hole(&mut v, ReplyForm::Structured, REPLY_FLAG_DONE, 7, 0, 8192, 4096);
    let h = decode_structured_header(&arr(&v)).unwrap();
    assert_eq!((h.flags, h.typ, h.len), (1, REPLY_TYPE_OFFSET_HOLE, 12));
    assert_eq!(&v[20..], &[0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0x10, 0]);

    let mut v = Vec::new();
    encode_error_offset_chunk(&mut v, ReplyForm::Structured, 0, 7, 0, EIO, "bad", 4096);
    let h = decode_structured_header(&arr(&v)).unwrap();
    assert_eq!((h.typ, h.len), (REPLY_TYPE_ERROR_OFFSET, 17));
    assert_eq!(&v[20..], b"\x00\x00\x00\x05\x00\x03bad\x00\x00\x00\x00\x00\x00\x10\x00");
}

#[test]
fn block_status_encodings() {
    let mut v = Vec::new();
    encode_block_status(&mut v, REPLY_FLAG_DONE, 3, 1, &[(4096, 3), (8192, 0)]);
    let h = decode_structured_header(&arr(&v)).unwrap();
    assert_eq!((h.flags, h.typ, h.cookie, h.len), (1, REPLY_TYPE_BLOCK_STATUS, 3, 20));
    assert_eq!(&v[20..], &[0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 3, 0, 0, 0x20, 0, 0, 0, 0, 0]);

    let mut v = Vec::new();
    encode_block_status_ext(&mut v, REPLY_FLAG_DONE, 3, 1 << 33, 1, &[(1 << 33, 2)]);
    let h = decode_extended_reply_header(&arr(&v)).unwrap();
    assert_eq!((h.typ, h.offset, h.len), (REPLY_TYPE_BLOCK_STATUS_EXT, 1 << 33, 24));
    assert_eq!(&v[32..40], &[0, 0, 0, 1, 0, 0, 0, 1]);
    assert_eq!(&v[40..48], &(1u64 << 33).to_be_bytes());
    assert_eq!(&v[48..56], &2u64.to_be_bytes());
}

#[test]
fn info_request_parsing() {
    let d = encode_info_request("disk", &[INFO_BLOCK_SIZE, INFO_NAME]);
    assert_eq!(
        parse_info_request(&d),
        Ok(InfoRequest { name: "disk".into(), infos: vec![INFO_BLOCK_SIZE, INFO_NAME] })
    );
    // Name length greater than optlen - 6.
    let mut bad = d.clone();
    bad[3] = 9;
    assert!(matches!(parse_info_request(&bad), Err(OptionDataError::Invalid(_))));
    // Trailing junk and a missing byte.
    let mut junk = d.clone();
    junk.push(0);
    assert!(parse_info_request(&junk).is_err());
    assert!(parse_info_request(&d[..d.len() - 1]).is_err());
    // Truncated before the count, and empty.
    assert!(parse_info_request(&d[..8]).is_err());
    assert!(parse_info_request(&[]).is_err());
    // A name over 4096 bytes, NUL, bad UTF-8.
    assert!(parse_info_request(&encode_info_request(&"x".repeat(4097), &[])).is_err());
    assert!(parse_info_request(&encode_info_request(&"x".repeat(4096), &[])).is_ok());
    assert!(parse_info_request(&encode_info_request("a\0b", &[])).is_err());
    let mut utf = encode_info_request("ab", &[]);
    utf[4] = 0xff;
    assert!(parse_info_request(&utf).is_err());
    // A huge declared length allocates nothing and fails cleanly.
    assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());
}

#[test]
fn meta_context_request_parsing() {
    let d = encode_meta_context_request("", &["base:allocation", "qemu:dirty-bitmap:x"]);
    assert_eq!(
        parse_meta_context_request(&d, 128),
        Ok(MetaContextRequest {
            name: String::new(),
            queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()]
        })
    );
    assert_eq!(parse_meta_context_request(&d, 1).unwrap_err().reply_type(), REP_ERR_TOO_BIG);
    // A query length that overruns the option.
    let mut bad = d.clone();
    bad[11] = 200;
    assert_eq!(parse_meta_context_request(&bad, 128).unwrap_err().reply_type(), REP_ERR_INVALID);
    // A count the data cannot hold is INVALID, not TOO_BIG.
    let mut bad = encode_meta_context_request("", &[]);
    bad[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(parse_meta_context_request(&bad, 128).unwrap_err().reply_type(), REP_ERR_INVALID);
    let mut junk = d;
    junk.push(1);
    assert!(parse_meta_context_request(&junk, 128).is_err());
}
