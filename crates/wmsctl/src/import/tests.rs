//! The import reader on whole inputs: formats, headers, and malformed bytes of every kind, with
//! property tests that feed it arbitrary input and check that it never panics, numbers lines
//! correctly, and reads back exactly what a standard CSV writer wrote.

use std::io::Cursor;

use proptest::prelude::*;

use super::*;

fn open(input: &[u8], format: Option<Format>) -> Result<Reader, OpenError> {
    Reader::open(Box::new(Cursor::new(input.to_vec())), format)
}

fn records(input: &[u8], format: Option<Format>) -> Vec<Record> {
    let mut reader = open(input, format).expect("the input opens");
    std::iter::from_fn(|| reader.next_record().expect("reading from memory")).collect()
}

fn message(record: &Record) -> &str {
    record.fields.as_ref().expect_err("the record is refused")
}

const HEADER: &str = "key,kind,sku,qty,location,to_location,reference,reason\n";

#[test]
fn csv_lines_become_requests() {
    let input = format!(
        "{HEADER}k1,receive,S1,5,A1,,PO-1,\nk2,transfer,S1,2,A1,B1,,\nk3,adjust,S1,-3,A1,,,count\n"
    );
    let got = records(input.as_bytes(), None);
    let requests: Vec<(IdemKey, Request)> =
        got.iter().map(|r| r.fields.as_ref().unwrap().request().unwrap()).collect();
    assert_eq!(got.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 3, 4]);
    assert_eq!(requests[0].0.as_str(), "k1");
    assert_eq!(requests[0].1.reference.as_deref(), Some("PO-1"));
    assert_eq!(requests[1].1.to_location.as_deref(), Some("B1"));
    assert_eq!(requests[2].1.qty, -3);
}

#[test]
fn columns_come_in_any_order_and_case_and_error_is_ignored() {
    let input = "Location, QTY ,sku,kind,key,error\nA1,+4,S1,receive,k1,line 9: old\n";
    let fields = records(input.as_bytes(), Some(Format::Csv)).remove(0).fields.unwrap();
    let (key, request) = fields.request().unwrap();
    assert_eq!((key.as_str(), request.qty, request.location.as_str()), ("k1", 4, "A1"));
}

#[test]
fn header_problems_stop_the_file() {
    let header_error = |input: &str| match open(input.as_bytes(), None) {
        Err(OpenError::Data { line, message }) => (line, message),
        other => panic!("expected a header error, got {other:?}"),
    };
    let (line, unknown) = header_error("\n\nkey,kind,sku,qty,location,colour\n");
    assert_eq!(line, 3);
    assert!(unknown.starts_with("unknown column \"colour\" in the header"), "{unknown}");
    let (_, missing) = header_error("key,kind,sku,location\n");
    assert!(missing.contains("lacks the required column(s) qty"), "{missing}");
    let (_, twice) = header_error("key,kind,sku,qty,location,sku\n");
    assert!(twice.contains("\"sku\" appears twice"), "{twice}");
    let (_, data) = header_error("k1,receive,S1,5,A1\n");
    assert!(data.contains("the first line must be a header"), "{data}");
}

#[test]
fn utf16_input_is_named_as_such() {
    let bytes: Vec<u8> = "\u{feff}key,kind\n".encode_utf16().flat_map(u16::to_le_bytes).collect();
    match open(&bytes, None) {
        Err(OpenError::Data { line: 1, message }) => assert!(message.contains("UTF-16")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn empty_inputs() {
    for input in ["", "\n", " \r\n\t\n"] {
        assert!(matches!(open(input.as_bytes(), None), Err(OpenError::Empty)), "{input:?}");
        let jsonl = open(input.as_bytes(), Some(Format::Jsonl));
        assert!(matches!(jsonl, Err(OpenError::Empty)), "{input:?}");
    }
    assert!(records(HEADER.as_bytes(), None).is_empty(), "a header alone is no error");
}

#[test]
fn format_is_sniffed_from_the_first_byte() {
    let reader = open(b"\n  {\"key\":\"k\"}\n", None).unwrap();
    assert_eq!(reader.format(), Format::Jsonl);
    assert_eq!(open(HEADER.as_bytes(), None).unwrap().format(), Format::Csv);
    assert_eq!(Format::from_extension(Path::new("in.NDJSON")), Some(Format::Jsonl));
    assert_eq!(Format::from_extension(Path::new("in.csv")), Some(Format::Csv));
    assert_eq!(Format::from_extension(Path::new("in.txt")), None);
}

#[test]
fn bom_crlf_and_quoted_newlines_keep_line_numbers_right() {
    let input = format!(
        "\u{feff}{}k1,receive,S1,1,A1,,\"two\r\nlines\",\r\n\r\nk2,receive,S1,x,A1,,,\r\n",
        HEADER.replace('\n', "\r\n")
    );
    let got = records(input.as_bytes(), None);
    assert_eq!(got[0].line, 2);
    assert_eq!(got[0].fields.as_ref().unwrap().reference.as_deref(), Some("two\nlines"));
    assert_eq!(got[1].line, 5, "the quoted line break and the blank line are counted");
    assert_eq!(message(&got[1]), "invalid qty: \"x\" is not a whole number");
}

#[test]
fn malformed_records_are_refused_alone() {
    let mut input = HEADER.as_bytes().to_vec();
    input.extend_from_slice(b"k1,receive,S\xff,1,A1,,,\n");
    input.extend_from_slice(b"k2,receive,S1,1,A1\n");
    input.extend_from_slice(b",,,,,,,\n");
    input.extend_from_slice(&vec![b'z'; 3 * MAX_RECORD_BYTES]);
    input.extend_from_slice(b"\nk3,receive,S1,1,A1,,,\n");
    let got = records(&input, None);

    assert_eq!(message(&got[0]), "the line is not valid UTF-8");
    assert!(matches!(&got[0].original, Original::Csv(cells) if cells[2] == "S\u{fffd}"));
    assert_eq!(message(&got[1]), "expected 8 fields as in the header, found 5");
    assert_eq!(got[2].line, 5, "a row of empty cells is skipped like a blank line");
    assert_eq!(message(&got[2]), "the line is longer than the limit of 1 MiB");
    assert_eq!((got[3].line, got[3].fields.as_ref().unwrap().key.as_deref()), (6, Some("k3")));
    assert_eq!(got.len(), 4);
}

#[test]
fn jsonl_lines_are_refused_alone() {
    let mut input =
        b"{\"key\":\"k1\",\"kind\":\"receive\",\"sku\":\"S\",\"qty\":1,\"location\":\"A\"}\n"
            .to_vec();
    input.extend_from_slice(b"[1]\n\n{\"qty\":true}\n");
    input.extend_from_slice(&vec![b'x'; MAX_RECORD_BYTES + 1]);
    input.extend_from_slice(b"\n{}\n{\"key\":\"k2\"}");
    let got = records(&input, None);
    assert_eq!(got.iter().map(|r| r.line).collect::<Vec<_>>(), [1, 2, 4, 5, 6, 7]);
    assert!(got[0].fields.as_ref().unwrap().request().is_ok());
    assert_eq!(message(&got[1]), "expected a JSON object, found an array");
    assert_eq!(message(&got[2]), "invalid qty: must be a number, found a boolean");
    assert_eq!(message(&got[3]), "the line is longer than the limit of 1 MiB");
    assert_eq!(got[4].fields.as_ref().unwrap().request().unwrap_err(), "missing key");
    assert_eq!(got[5].fields.as_ref().unwrap().request().unwrap_err(), "missing kind");
}

#[test]
fn validation_messages_name_the_field() {
    let request = |line: &str| {
        let input = format!("{HEADER}{line}\n");
        records(input.as_bytes(), None).remove(0).fields.unwrap().request().map(|_| ())
    };
    assert_eq!(request("k1,receive,,1,A1,,,"), Err("missing sku".to_owned()));
    assert_eq!(request(",receive,S,1,A1,,,"), Err("missing key".to_owned()));
    assert!(request("k 1,receive,S,1,A1,,,").unwrap_err().starts_with("invalid key"));
    assert!(request("k1,adjust,S,0,A1,,,count").unwrap_err().starts_with("invalid qty: must be"));
    assert!(request("k1,receive,S,1,A1,B1,,").unwrap_err().starts_with("invalid to_location"));
    assert!(request("k1,adjust,S,1,A1,,,").unwrap_err().starts_with("invalid reason"));
}

/// Reads everything, checking what must hold of any input: no panic, and each record starts on
/// a later line than the one before, within the input.
fn read_all(input: &[u8], format: Option<Format>) {
    let Ok(mut reader) = open(input, format) else {
        return;
    };
    let physical_lines = input.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
    let mut previous = 0;
    while let Some(record) = reader.next_record().expect("reading from memory") {
        assert!(record.line > previous && record.line <= physical_lines, "line {}", record.line);
        previous = record.line;
        if let Ok(fields) = &record.fields {
            let _ = fields.request();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        read_all(&bytes, None);
        read_all(&bytes, Some(Format::Csv));
        read_all(&bytes, Some(Format::Jsonl));
        let mut with_header = HEADER.as_bytes().to_vec();
        with_header.extend_from_slice(&bytes);
        read_all(&with_header, Some(Format::Csv));
    }

    #[test]
    fn arbitrary_lines_never_panic(
        lines in proptest::collection::vec("[a-z0-9,\"{}:\\[\\] \r\t\u{feff}é-]{0,40}", 0..30),
    ) {
        let body = lines.join("\n");
        read_all(format!("{HEADER}{body}").as_bytes(), None);
        read_all(body.as_bytes(), Some(Format::Jsonl));
        let json: Vec<String> = lines.iter().map(|l| format!("{{\"key\":{l:?},\"qty\":{}}}", l.len())).collect();
        read_all(json.join("\n").as_bytes(), Some(Format::Jsonl));
    }

    /// Whatever a standard CSV writer produces, the reader gives back cell for cell, and every
    /// record starts on the physical line after the last line break of the records before it.
    #[test]
    fn csv_written_by_the_csv_crate_reads_back_exactly(
        rows in proptest::collection::vec(
            proptest::collection::vec("[a-z\",\r\n é]{0,12}", 8),
            1..12,
        ),
    ) {
        let mut writer = csv::WriterBuilder::new().from_writer(Vec::new());
        writer.write_record(HEADER.trim_end().split(',')).unwrap();
        for row in &rows {
            writer.write_record(row).unwrap();
        }
        let written = writer.into_inner().unwrap();
        let mut reader = open(&written, Some(Format::Csv)).unwrap();
        let mut expected_line = 2;
        for row in rows.iter().filter(|row| row.iter().any(|cell| !cell.is_empty())) {
            let record = reader.next_record().unwrap().expect("a record per row");
            let Original::Csv(cells) = &record.original else { panic!("{record:?}") };
            // Inside quotes a CRLF reads back as a line feed, like every line ending.
            let want: Vec<String> = row.iter().map(|c| c.replace("\r\n", "\n")).collect();
            prop_assert_eq!(cells, &want);
            prop_assert_eq!(record.line, expected_line);
            expected_line = record.line + 1 + row.iter().map(|c| c.matches('\n').count() as u64).sum::<u64>();
        }
        prop_assert!(reader.next_record().unwrap().is_none());
    }
}
