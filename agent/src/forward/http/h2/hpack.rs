//! A passive HPACK decoder (RFC 7541) for following HTTP/2 header blocks: one per direction,
//! kept in step with the sending endpoint's encoder by decoding every block, in order. It
//! decodes only what it must: every entry the encoder adds to the dynamic table, and the
//! values of the other fields whose names the caller wants (:status, :authority, ...); the
//! values of the rest (a server's date and etag, sent again on each response) are skipped
//! undecoded. No allocation but for table entries (one each): names and values are decoded
//! into scratch buffers of the thread's, so an idle connection's decoder holds only its table.
//!
//! Why not a crate: fluke-hpack builds a HashMap for every Huffman string it decodes (300 us
//! of CPU per request here), and httlib-hpack panics on malformed input (found by the
//! `h2_frames` fuzz target). fluke-hpack, which passes h2spec, is this decoder's reference in
//! the fuzz target `hpack`, which compares the two on every input.

use std::{cell::RefCell, collections::VecDeque, sync::OnceLock};

/// How a header block failed to decode. The connection goes on unobserved.
#[derive(Debug, PartialEq, Eq)]
pub enum HpackError {
    /// The block ended inside a field.
    Truncated,
    /// An integer longer than any table, string or size this decoder accepts.
    IntegerTooLarge,
    /// Index 0, or past the end of the tables.
    BadIndex,
    /// A dynamic table size update over what the receiving endpoint allowed.
    TableSizeTooLarge,
    /// Huffman: the EOS symbol inside a string, or padding that is not EOS's prefix.
    BadHuffman,
}

/// The overhead RFC 7541 section 4.1 counts for every table entry.
const ENTRY_OVERHEAD: usize = 32;
/// The largest integer accepted: lengths and sizes beyond it cannot be legitimate here.
const MAX_INTEGER: usize = 1 << 24;
/// Continuation octets after the prefix: 4 carry 28 bits, more than MAX_INTEGER needs. (A
/// run of zero-valued ones would otherwise go on for ever, shifting past the word.)
const MAX_INTEGER_OCTETS: usize = 4;

/// RFC 7541 Appendix A.
static STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// Every symbol's Huffman code length (RFC 7541 Appendix B), 0-255 and EOS (256). The code
/// is canonical: codes of one length are consecutive, in symbol order, and each length's
/// first code follows the last of the shorter ones. So the lengths define it.
static HUFFMAN_CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

const EOS: u16 = 256;
const LONGEST_CODE: usize = 30;

/// Codes this long or shorter are decoded by one lookup of the next byte's worth of bits.
const SHORT_CODE: u32 = 8;

/// The canonical code, by length: its first code, how many codes, where its symbols start.
struct HuffmanCode {
    first: [u32; LONGEST_CODE + 1],
    count: [u32; LONGEST_CODE + 1],
    offset: [u16; LONGEST_CODE + 1],
    /// Symbols ordered by (code length, symbol).
    symbols: [u16; 257],
    /// For each value of the next 8 bits, the code of at most 8 bits they begin with, if any:
    /// (symbol, length), length 0 for none. Most characters of header values (letters,
    /// digits, common punctuation) have codes of 5-8 bits, so they cost one lookup each
    /// instead of one step per bit.
    short: [(u8, u8); 256],
}

impl HuffmanCode {
    fn get() -> &'static Self {
        static CODE: OnceLock<HuffmanCode> = OnceLock::new();
        CODE.get_or_init(Self::build)
    }

    fn build() -> Self {
        let mut code = Self {
            first: [0; LONGEST_CODE + 1],
            count: [0; LONGEST_CODE + 1],
            offset: [0; LONGEST_CODE + 1],
            symbols: [0; 257],
            short: [(0, 0); 256],
        };
        for &length in &HUFFMAN_CODE_LENGTHS {
            code.count[usize::from(length)] += 1;
        }
        let (mut next_code, mut next_offset) = (0u32, 0u16);
        for length in 1..=LONGEST_CODE {
            next_code <<= 1;
            code.first[length] = next_code;
            code.offset[length] = next_offset;
            next_code += code.count[length];
            next_offset += code.count[length] as u16;
        }
        let mut placed = code.offset;
        for (symbol, &length) in HUFFMAN_CODE_LENGTHS.iter().enumerate() {
            let slot = &mut placed[usize::from(length)];
            code.symbols[usize::from(*slot)] = symbol as u16;
            *slot += 1;
        }
        for (byte, entry) in code.short.iter_mut().enumerate() {
            *entry = (1..=SHORT_CODE as usize)
                .find_map(|length| {
                    let index = (byte as u32 >> (SHORT_CODE as usize - length))
                        .wrapping_sub(code.first[length]);
                    (index < code.count[length]).then(|| {
                        let symbol =
                            code.symbols[usize::from(code.offset[length]) + index as usize];
                        (symbol as u8, length as u8)
                    })
                })
                .unwrap_or((0, 0));
        }
        code
    }

    /// Decodes `encoded` into `out` (appended). The bits not yet decoded are kept in `window`,
    /// most significant first; each step decodes one symbol from its top: a short code by
    /// lookup, a longer one by the canonical search from 9 bits up.
    fn decode(&self, encoded: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
        let (mut window, mut bits, mut next) = (0u64, 0u32, 0usize);
        loop {
            while bits <= 56 && next < encoded.len() {
                window |= u64::from(encoded[next]) << (56 - bits);
                bits += 8;
                next += 1;
            }
            let (symbol, length) = self.short[(window >> 56) as usize];
            let length = u32::from(length);
            if length != 0 && length <= bits {
                out.push(symbol);
                window <<= length;
                bits -= length;
                continue;
            }
            // No code of 8 bits or fewer starts here; with 8 bits or fewer left, no code does.
            if bits <= SHORT_CODE {
                break;
            }
            match self.long_code(window, bits)? {
                Some((symbol, length)) => {
                    out.push(symbol);
                    window <<= length;
                    bits -= length;
                }
                None => break,
            }
        }
        // What is left is padding: fewer than 8 bits, all ones (the most significant bits of
        // EOS). The input is all consumed: the window is refilled before it runs this low.
        let rest = if bits == 0 { 0 } else { window >> (64 - bits) };
        if bits > 7 || rest != (1 << bits) - 1 {
            return Err(HpackError::BadHuffman);
        }
        Ok(())
    }

    /// The code of 9 to 30 bits at the top of `window` (`bits` of it are input): its symbol
    /// and length, or None if the input ends inside it.
    fn long_code(&self, window: u64, bits: u32) -> Result<Option<(u8, u32)>, HpackError> {
        for length in SHORT_CODE + 1..=bits.min(LONGEST_CODE as u32) {
            let code = (window >> (64 - length)) as u32;
            let index = code.wrapping_sub(self.first[length as usize]);
            if index < self.count[length as usize] {
                let symbol =
                    self.symbols[usize::from(self.offset[length as usize]) + index as usize];
                if symbol == EOS {
                    return Err(HpackError::BadHuffman);
                }
                return Ok(Some((symbol as u8, length)));
            }
        }
        if bits >= LONGEST_CODE as u32 {
            return Err(HpackError::BadHuffman);
        }
        Ok(None)
    }

    /// The same, one bit at a time: the reference `decode` is tested against.
    #[cfg(test)]
    fn decode_bitwise(&self, encoded: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
        let (mut code, mut length) = (0u32, 0usize);
        for byte in encoded {
            for shift in (0..8).rev() {
                code = code << 1 | u32::from(byte >> shift & 1);
                length += 1;
                let index = code.wrapping_sub(self.first[length]);
                if index < self.count[length] {
                    let symbol = self.symbols[usize::from(self.offset[length]) + index as usize];
                    if symbol == EOS {
                        return Err(HpackError::BadHuffman);
                    }
                    out.push(symbol as u8);
                    (code, length) = (0, 0);
                } else if length == LONGEST_CODE {
                    return Err(HpackError::BadHuffman);
                }
            }
        }
        // Padding: fewer than 8 bits, all ones (the most significant bits of EOS).
        if length > 7 || code != (1 << length) - 1 {
            return Err(HpackError::BadHuffman);
        }
        Ok(())
    }
}

/// A table entry: its name and value in one allocation (nginx adds several entries to its
/// table with every response, so each one's cost is paid per request).
struct Entry {
    bytes: Box<[u8]>,
    name_len: usize,
}

impl Entry {
    fn new(name: &[u8], value: &[u8]) -> Self {
        Self {
            bytes: [name, value].concat().into_boxed_slice(),
            name_len: name.len(),
        }
    }

    fn name_and_value(&self) -> (&[u8], &[u8]) {
        self.bytes.split_at(self.name_len)
    }

    /// Its size as RFC 7541 section 4.1 counts it.
    fn size(&self) -> usize {
        self.bytes.len() + ENTRY_OVERHEAD
    }
}

/// The dynamic table (RFC 7541 section 2.3.2): newest first.
#[derive(Default)]
struct DynamicTable {
    entries: VecDeque<Entry>,
    size: usize,
    max_size: usize,
}

impl DynamicTable {
    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max_size {
            // Section 4.4: an entry larger than the table empties it and is not added.
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max_size - size);
        self.entries.push_front(Entry::new(name, value));
        self.size += size;
    }

    fn resize(&mut self, max_size: usize) {
        self.max_size = max_size;
        self.evict_to(max_size);
    }

    fn evict_to(&mut self, size: usize) {
        while self.size > size {
            let Some(entry) = self.entries.pop_back() else {
                break;
            };
            self.size -= entry.size();
        }
    }
}

/// One direction's decoder.
pub struct HpackDecoder {
    table: DynamicTable,
    /// The largest size update accepted: what the receiving endpoint's SETTINGS allowed.
    allowed: usize,
}

/// A decoded field's name and value, reused from field to field.
#[derive(Default)]
struct Scratch {
    name: Vec<u8>,
    value: Vec<u8>,
}

thread_local! {
    /// Lent to one `decode` at a time (the proxy runs one runtime per thread).
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

impl HpackDecoder {
    /// A decoder whose table starts at `size`, the size every endpoint starts with.
    pub fn new(size: usize) -> Self {
        Self {
            table: DynamicTable {
                max_size: size,
                ..DynamicTable::default()
            },
            allowed: size,
        }
    }

    /// The receiving endpoint allows the encoder a table of up to `size`.
    pub fn allow(&mut self, size: usize) {
        self.allowed = size;
    }

    /// Decodes one header block, calling `field` with each field's name and value, except
    /// fields neither indexed nor `wanted` by name, whose values are skipped undecoded.
    pub fn decode(
        &mut self,
        block: &[u8],
        wanted: impl Fn(&[u8]) -> bool,
        field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut scratch) => self.decode_with(block, wanted, field, &mut scratch),
            // Only if a caller's `field` decoded another block: fresh buffers, then.
            Err(_) => self.decode_with(block, wanted, field, &mut Scratch::default()),
        })
    }

    fn decode_with(
        &mut self,
        block: &[u8],
        wanted: impl Fn(&[u8]) -> bool,
        mut field: impl FnMut(&[u8], &[u8]),
        scratch: &mut Scratch,
    ) -> Result<(), HpackError> {
        let mut input = Input(block);
        while let Some(&first) = input.0.first() {
            if first & 0x80 != 0 {
                // Indexed field (section 6.1).
                let index = input.integer(7)?;
                let (name, value) = entry(&self.table, index)?;
                field(name, value);
            } else if first & 0x40 != 0 {
                // Literal with incremental indexing (section 6.2.1).
                self.literal(&mut input, 6, &|_| true, scratch)?;
                field(&scratch.name, &scratch.value);
                self.table.insert(&scratch.name, &scratch.value);
            } else if first & 0x20 != 0 {
                // Dynamic table size update (section 6.3).
                let size = input.integer(5)?;
                if size > self.allowed {
                    return Err(HpackError::TableSizeTooLarge);
                }
                self.table.resize(size);
            } else {
                // Literal without indexing or never indexed (sections 6.2.2, 6.2.3).
                if self.literal(&mut input, 4, &wanted, scratch)? {
                    field(&scratch.name, &scratch.value);
                }
            }
        }
        Ok(())
    }

    /// A literal field into `scratch`; its value only if `wanted` by name. Returns whether
    /// the value was decoded.
    fn literal(
        &self,
        input: &mut Input<'_>,
        prefix: u8,
        wanted: &impl Fn(&[u8]) -> bool,
        scratch: &mut Scratch,
    ) -> Result<bool, HpackError> {
        let index = input.integer(prefix)?;
        scratch.name.clear();
        if index == 0 {
            input.string(&mut scratch.name)?;
        } else {
            let (name, _) = entry(&self.table, index)?;
            scratch.name.extend_from_slice(name);
        }
        scratch.value.clear();
        if wanted(&scratch.name) {
            input.string(&mut scratch.value)?;
            Ok(true)
        } else {
            input.skip_string()?;
            Ok(false)
        }
    }
}

/// The field at `index` of the static table (1-61) and then `table` (62-).
fn entry(table: &DynamicTable, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
    match index {
        0 => Err(HpackError::BadIndex),
        1..=61 => Ok(STATIC_TABLE[index - 1]),
        _ => table
            .entries
            .get(index - 62)
            .map(Entry::name_and_value)
            .ok_or(HpackError::BadIndex),
    }
}

/// The rest of a header block.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    /// An integer with an `prefix`-bit prefix (section 5.1).
    fn integer(&mut self, prefix: u8) -> Result<usize, HpackError> {
        let (&first, mut rest) = self.0.split_first().ok_or(HpackError::Truncated)?;
        let mask = (1usize << prefix) - 1;
        let mut value = usize::from(first) & mask;
        if value == mask {
            let mut shift = 0;
            for octet in 1.. {
                if octet > MAX_INTEGER_OCTETS {
                    return Err(HpackError::IntegerTooLarge);
                }
                let (&byte, after) = rest.split_first().ok_or(HpackError::Truncated)?;
                rest = after;
                value += usize::from(byte & 0x7f) << shift;
                if value > MAX_INTEGER {
                    return Err(HpackError::IntegerTooLarge);
                }
                if byte & 0x80 == 0 {
                    break;
                }
                shift += 7;
            }
        }
        self.0 = rest;
        Ok(value)
    }

    /// A string literal (section 5.2), Huffman-decoded if it is encoded, appended to `out`.
    fn string(&mut self, out: &mut Vec<u8>) -> Result<(), HpackError> {
        let (huffman, bytes) = self.string_bytes()?;
        if huffman {
            HuffmanCode::get().decode(bytes, out)
        } else {
            out.extend_from_slice(bytes);
            Ok(())
        }
    }

    fn skip_string(&mut self) -> Result<(), HpackError> {
        self.string_bytes().map(drop)
    }

    fn string_bytes(&mut self) -> Result<(bool, &[u8]), HpackError> {
        let huffman = self.0.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
        let length = self.integer(7)?;
        if length > self.0.len() {
            return Err(HpackError::Truncated);
        }
        let (bytes, rest) = self.0.split_at(length);
        self.0 = rest;
        Ok((huffman, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        let digits: String = text.chars().filter(char::is_ascii_hexdigit).collect();
        (0..digits.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
            .collect()
    }

    fn decode_all(decoder: &mut HpackDecoder, block: &[u8]) -> Vec<(String, String)> {
        let mut fields = Vec::new();
        decoder
            .decode(
                block,
                |_| true,
                |name, value| {
                    let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).unwrap();
                    fields.push((text(name), text(value)));
                },
            )
            .unwrap();
        fields
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    /// RFC 7541 C.4: three requests with Huffman coding, on one connection.
    #[test]
    fn rfc_7541_requests_with_huffman() {
        let mut decoder = HpackDecoder::new(4096);
        let first = hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff");
        assert_eq!(
            decode_all(&mut decoder, &first),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ])
        );
        let second = hex("8286 84be 5886 a8eb 1064 9cbf");
        assert_eq!(
            decode_all(&mut decoder, &second),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ])
        );
        let third = hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf");
        assert_eq!(
            decode_all(&mut decoder, &third),
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
        assert_eq!(decoder.table.size, 164);
    }

    /// RFC 7541 C.6: three responses with Huffman coding and a 256-byte table (evictions).
    #[test]
    fn rfc_7541_responses_with_huffman_and_evictions() {
        let mut decoder = HpackDecoder::new(256);
        let first = hex(
            "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 \
             2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
        );
        assert_eq!(
            decode_all(&mut decoder, &first),
            pairs(&[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ])
        );
        let second = hex("4883 640e ffc1 c0bf");
        assert_eq!(
            decode_all(&mut decoder, &second)[0],
            pairs(&[(":status", "307")])[0]
        );
        let third = hex(
            "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab \
             77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f \
             9587 3160 65c0 03ed 4ee5 b106 3d50 07",
        );
        let fields = decode_all(&mut decoder, &third);
        assert_eq!(
            fields[2],
            pairs(&[("date", "Mon, 21 Oct 2013 20:13:22 GMT")])[0]
        );
        assert_eq!(
            fields[5],
            pairs(&[(
                "set-cookie",
                "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
            )])[0]
        );
        assert_eq!(decoder.table.size, 215);
        assert_eq!(decoder.table.entries.len(), 3);
    }

    #[test]
    fn unwanted_values_are_skipped_and_their_fields_not_reported() {
        let mut decoder = HpackDecoder::new(4096);
        // :status 200 (indexed), then "date" literal without indexing (name index 33).
        let mut block = vec![0x88, 0x0f, 0x12, 0x03];
        block.extend_from_slice(b"now");
        let mut seen = Vec::new();
        decoder
            .decode(
                &block,
                |name| name == b":status",
                |name, value| seen.push((name.to_vec(), value.to_vec())),
            )
            .unwrap();
        assert_eq!(seen, vec![(b":status".to_vec(), b"200".to_vec())]);
    }

    #[test]
    fn malformed_blocks_are_errors() {
        let mut decoder = HpackDecoder::new(4096);
        let mut fails = |block: &[u8]| decoder.decode(block, |_| true, |_, _| {}).unwrap_err();
        assert_eq!(fails(&[0x80]), HpackError::BadIndex);
        assert_eq!(fails(&[0xbe]), HpackError::BadIndex);
        assert_eq!(fails(&[0xff]), HpackError::Truncated);
        assert_eq!(
            fails(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            HpackError::IntegerTooLarge
        );
        let zeros = [
            0x3f, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00,
        ];
        assert_eq!(fails(&zeros), HpackError::IntegerTooLarge);
        assert_eq!(fails(&[0x40, 0x05, b'a']), HpackError::Truncated);
        // 8 bits of padding, and padding of zeros.
        assert_eq!(fails(&[0x40, 0x81, 0xff, 0x00]), HpackError::BadHuffman);
        assert_eq!(fails(&[0x40, 0x81, 0x00, 0x00]), HpackError::BadHuffman);
        // A size update over the allowed 4096.
        assert_eq!(fails(&[0x3f, 0xe2, 0x1f]), HpackError::TableSizeTooLarge);
    }

    /// The code of `symbol` as (bits, length), from the canonical code.
    fn code_of(code: &HuffmanCode, symbol: u16) -> (u64, usize) {
        let length = usize::from(HUFFMAN_CODE_LENGTHS[usize::from(symbol)]);
        let position = code.symbols.iter().position(|&s| s == symbol).unwrap();
        let bits = code.first[length] + (position as u32 - u32::from(code.offset[length]));
        (u64::from(bits), length)
    }

    /// `symbols` Huffman-encoded, padded with ones.
    fn encode(code: &HuffmanCode, symbols: &[u16]) -> Vec<u8> {
        let (mut out, mut acc, mut bits) = (Vec::new(), 0u64, 0usize);
        for &symbol in symbols {
            let (value, length) = code_of(code, symbol);
            acc = acc << length | value;
            bits += length;
            while bits >= 8 {
                out.push((acc >> (bits - 8)) as u8);
                bits -= 8;
            }
        }
        if bits > 0 {
            out.push((acc << (8 - bits) | ((1 << (8 - bits)) - 1)) as u8);
        }
        out
    }

    /// The lookup decoder and the one-bit-at-a-time one agree on every input: valid strings of
    /// every symbol (short and long codes, padding of every length), the same cut short or with
    /// EOS inside, and arbitrary bytes.
    #[test]
    fn the_lookup_decoder_agrees_with_the_bitwise_one() {
        let code = HuffmanCode::get();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let agree = |input: &[u8]| {
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            let results = (
                code.decode(input, &mut fast),
                code.decode_bitwise(input, &mut slow),
            );
            assert_eq!(results.0, results.1, "input {input:02x?}");
            if results.0.is_ok() {
                assert_eq!(fast, slow, "input {input:02x?}");
            }
            results.0.is_ok()
        };
        let mut valid = 0;
        for round in 0..20_000 {
            let length = (random() % 24) as usize;
            let input: Vec<u8> = if round % 2 == 0 {
                let symbols: Vec<u16> = (0..length)
                    .map(|_| match random() % 4 {
                        // Mostly printable ASCII, as header values are; sometimes any byte.
                        0 => (random() % 256) as u16,
                        _ => (0x20 + random() % 0x5f) as u16,
                    })
                    .collect();
                let mut encoded = encode(code, &symbols);
                match random() % 8 {
                    0 => {
                        encoded.pop();
                    }
                    1 => encoded.extend(encode(code, &[EOS])),
                    _ => {}
                }
                encoded
            } else {
                (0..length).map(|_| random() as u8).collect()
            };
            if agree(&input) {
                valid += 1;
            }
        }
        assert!(valid > 5_000, "only {valid} valid inputs were tried");
    }

    #[test]
    fn every_symbol_round_trips_through_the_canonical_code() {
        // Encode each symbol with the code built from the lengths, padded with ones.
        let code = HuffmanCode::get();
        for symbol in 0..=255u16 {
            let length = usize::from(HUFFMAN_CODE_LENGTHS[usize::from(symbol)]);
            let position = code.symbols.iter().position(|&s| s == symbol).unwrap();
            let bits = code.first[length] + (position as u32 - u32::from(code.offset[length]));
            let padding = (8 - length % 8) % 8;
            let padded = (u64::from(bits) << padding) | ((1 << padding) - 1);
            let bytes = (length + padding) / 8;
            let encoded: Vec<u8> = (0..bytes)
                .rev()
                .map(|i| (padded >> (8 * i)) as u8)
                .collect();
            let mut out = Vec::new();
            code.decode(&encoded, &mut out).unwrap();
            assert_eq!(out, vec![symbol as u8], "symbol {symbol}");
        }
    }
}
