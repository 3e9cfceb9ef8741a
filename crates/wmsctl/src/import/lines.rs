//! Physical lines of an input, numbered from 1, with a cap on their length: a file with a 10 GB
//! line, or no line break at all, is read in bounded memory and the overlong line is flagged
//! rather than held. CRLF endings and a UTF-8 byte-order mark are removed here, so that neither
//! format has to know about them.

use std::io::{self, BufRead};

const BOM: &[u8] = b"\xef\xbb\xbf";

/// One physical line, without its line ending.
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    /// 1-based, counting every line of the input, blank ones included.
    pub number: u64,
    /// The line's bytes, cut short when `too_long` is set.
    pub text: &'a [u8],
    /// The line is longer than the cap; `text` holds only its beginning.
    pub too_long: bool,
}

impl Line<'_> {
    /// Empty, or nothing but spaces and tabs.
    pub fn is_blank(&self) -> bool {
        self.text.iter().all(|b| matches!(b, b' ' | b'\t'))
    }
}

/// Reads physical lines one at a time, keeping at most `max_len` bytes of each.
#[derive(Debug)]
pub struct Lines<R> {
    input: R,
    buf: Vec<u8>,
    number: u64,
    /// Bytes of the input consumed so far, line endings included.
    consumed: u64,
    too_long: bool,
    max_len: usize,
    /// The current line is handed out again by the next call (see [`Lines::push_back`]).
    again: bool,
}

impl<R: BufRead> Lines<R> {
    pub fn new(input: R, max_len: usize) -> Self {
        Lines {
            input,
            buf: Vec::new(),
            number: 0,
            consumed: 0,
            too_long: false,
            max_len,
            again: false,
        }
    }

    /// The number of the last line read, 0 before the first.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// How many bytes of the input the lines read so far took.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Makes the next call return the line the last call returned, once more.
    pub fn push_back(&mut self) {
        self.again = self.number > 0;
    }

    pub fn next_line(&mut self) -> io::Result<Option<Line<'_>>> {
        if std::mem::take(&mut self.again) {
            return Ok(Some(self.current()));
        }
        self.buf.clear();
        self.too_long = false;
        let mut any = false;
        loop {
            let available = match self.input.fill_buf() {
                Ok(available) => available,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            };
            if available.is_empty() {
                break;
            }
            any = true;
            let (content, used, ended) = match available.iter().position(|&b| b == b'\n') {
                Some(end) => (end, end + 1, true),
                None => (available.len(), available.len(), false),
            };
            // One byte of room beyond the cap, for the CR of a CRLF ending.
            let room = (self.max_len + 1).saturating_sub(self.buf.len());
            if content > room {
                self.too_long = true;
            }
            self.buf.extend_from_slice(&available[..content.min(room)]);
            self.input.consume(used);
            self.consumed += used as u64;
            if ended {
                break;
            }
        }
        if !any {
            return Ok(None);
        }

        self.number += 1;
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        if self.number == 1 && self.buf.starts_with(BOM) {
            self.buf.drain(..BOM.len());
        }
        if self.buf.len() > self.max_len {
            self.too_long = true;
            self.buf.truncate(self.max_len);
        }
        Ok(Some(self.current()))
    }

    fn current(&self) -> Line<'_> {
        Line { number: self.number, text: &self.buf, too_long: self.too_long }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[u8], max_len: usize) -> Vec<(u64, String, bool)> {
        let mut lines = Lines::new(input, max_len);
        let mut out = Vec::new();
        while let Some(line) = lines.next_line().unwrap() {
            out.push((line.number, String::from_utf8_lossy(line.text).into_owned(), line.too_long));
        }
        out
    }

    #[test]
    fn endings_bom_and_numbering() {
        let got = all(b"\xef\xbb\xbfa\r\nb\n\nc", 100);
        let want = [(1, "a", false), (2, "b", false), (3, "", false), (4, "c", false)];
        assert_eq!(got, want.map(|(n, t, l)| (n, t.to_owned(), l)));
        assert_eq!(all(b"a\n", 100).len(), 1, "a final newline ends the last line");
        assert!(all(b"", 100).is_empty());
    }

    #[test]
    fn overlong_lines_are_cut_and_flagged_and_reading_goes_on() {
        let mut input = vec![b'x'; 50];
        input.extend_from_slice(b"\nok\r\n");
        input.extend_from_slice(&[b'y'; 11]);
        let got = all(&input, 10);
        assert_eq!(got[0], (1, "x".repeat(10), true));
        assert_eq!(got[1], (2, "ok".to_owned(), false));
        assert_eq!(got[2], (3, "y".repeat(10), true));
        let exactly = all(b"0123456789\r\n", 10);
        assert_eq!(exactly, [(1, "0123456789".to_owned(), false)], "the CR does not count");
    }

    #[test]
    fn push_back_returns_the_same_line_once() {
        let mut lines = Lines::new(&b"a\nb\n"[..], 10);
        assert_eq!(lines.next_line().unwrap().unwrap().text, b"a");
        lines.push_back();
        assert_eq!(lines.next_line().unwrap().unwrap().number, 1);
        assert_eq!(lines.next_line().unwrap().unwrap().text, b"b");
        assert!(lines.next_line().unwrap().is_none());
    }
}
