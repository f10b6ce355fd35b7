//! The h2c observer's HPACK decoder against fluke-hpack (which passes h2spec), block after
//! block on one connection, so the dynamic tables must stay in step too.
//!
//! The input: a byte choosing the table size the receiving endpoint allows (its SETTINGS),
//! then header blocks, each a length byte and that many bytes. Asserts, per block:
//! - where fluke-hpack decodes a block, the agent's decoder decodes it to the same fields;
//! - where the agent's decoder skips unwanted values (every other field's, here), the fields
//!   it does report are the same, and its table stays in step (the next blocks agree);
//! - the agent's decoder fails only where fluke-hpack fails. fluke-hpack also refuses a block
//!   that ends with a size update, which the agent's decoder (a passive observer) accepts; and
//!   it panics on a size update it cannot read (`decode_integer(..).ok().unwrap()`), so a
//!   block the agent's decoder finds truncated or with an oversized integer is not given to it.
#![no_main]

use agent::fuzzing::{HpackDecoder, HpackError};
use fluke_hpack::decoder::DecoderError;
use libfuzzer_sys::fuzz_target;

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

fn decode(
    decoder: &mut HpackDecoder,
    block: &[u8],
    every_other: bool,
) -> Result<Fields, HpackError> {
    let mut fields = Vec::new();
    let wanted_toggle = std::cell::Cell::new(false);
    let wanted = |_: &[u8]| {
        let wanted = !every_other || wanted_toggle.get();
        wanted_toggle.set(!wanted_toggle.get());
        wanted
    };
    let result = decoder.decode(block, wanted, |name, value| {
        fields.push((name.to_vec(), value.to_vec()));
    });
    result.map(|()| fields)
}

fuzz_target!(|input: &[u8]| {
    let Some((&size, mut rest)) = input.split_first() else {
        return;
    };
    let allowed = usize::from(size) * 64;
    let mut reference = fluke_hpack::Decoder::new();
    reference.set_max_allowed_table_size(allowed);
    let mut full = HpackDecoder::new(4096);
    full.allow(allowed);
    let mut skipping = HpackDecoder::new(4096);
    skipping.allow(allowed);
    while let Some((&length, after)) = rest.split_first() {
        let length = usize::from(length).min(after.len());
        let (block, after) = after.split_at(length);
        rest = after;
        let decoded = decode(&mut full, block, false);
        let skipped = decode(&mut skipping, block, true);
        if matches!(
            decoded,
            Err(HpackError::Truncated | HpackError::IntegerTooLarge)
        ) {
            return;
        }
        match reference.decode(block) {
            Ok(fields) => {
                assert_eq!(decoded.as_ref(), Ok(&fields), "block {block:02x?}");
                let reported = skipped.expect("the skipping decoder decodes it too");
                assert!(
                    reported.iter().all(|field| fields.contains(field)),
                    "skipping reported a field fluke-hpack did not"
                );
            }
            Err(DecoderError::SizeUpdateAtEnd) => return,
            Err(error) => {
                assert!(
                    decoded.is_err(),
                    "fluke-hpack failed ({error:?}), the agent's did not"
                );
                return;
            }
        }
    }
});
