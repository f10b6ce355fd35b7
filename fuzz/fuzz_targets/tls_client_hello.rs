//! The TLS ClientHello / SNI reader in `agent::detect`, on well-formed hellos.
//!
//! The fuzzer's bytes describe a ClientHello (versions, random, session id, cipher suites,
//! compression methods, extensions in any order with any kinds, GREASE included, a
//! server_name extension with one or more entries whose names are DNS names or any bytes,
//! the size of the records it is split into, if it is split, and what follows it), which is
//! encoded as a client would send it. Asserts:
//! - `detect` reports TLS with exactly the name the hello carries (the first server_name
//!   extension's first entry if a host_name and a sane DNS name, lowercased; else none);
//! - every strict prefix of the hello needs more bytes (it is never opaque, nor TLS early);
//! - bytes after the hello (the next record, early data) change nothing.
//!
//! Raw, malformed bytes are the `detect` target's (against `sockmesh_fuzz::tls`).
#![no_main]

use agent::detect::{self, Detection};
use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};
use sockmesh_fuzz::tls;

fuzz_target!(|data: &[u8]| {
    let mut input = Unstructured::new(data);
    let Ok(hello) = Hello::arbitrary(&mut input) else {
        return;
    };
    let record = hello.encode();
    let want = Detection::Tls {
        sni: hello.expected_sni(),
    };
    assert_eq!(detect::detect(&record), want, "hello {hello:?}");
    for cut in 1..record.len() {
        assert_eq!(
            detect::detect(&record[..cut]),
            Detection::NeedMore,
            "cut at {cut} of {}",
            record.len()
        );
    }
    let mut followed = record.clone();
    followed.extend_from_slice(&hello.after);
    assert_eq!(
        detect::detect(&followed),
        want,
        "with bytes after the hello"
    );
});

#[derive(Debug)]
struct Hello {
    record_minor: u8,
    /// Split across records of this many bytes of the handshake message each.
    record_size: Option<usize>,
    legacy_version: [u8; 2],
    random: [u8; 32],
    session_id: Vec<u8>,
    cipher_suites: Vec<u16>,
    compression: Vec<u8>,
    extensions: Vec<Extension>,
    after: Vec<u8>,
}

#[derive(Debug)]
enum Extension {
    /// server_name: (name_type, name) entries.
    ServerName(Vec<(u8, Vec<u8>)>),
    Other {
        kind: u16,
        body: Vec<u8>,
    },
}

/// The sorts of names clients send, and bytes no client should.
fn name(input: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    const DNS: &[u8] = b"abcxyzABCXYZ0123456789.-_";
    Ok(match input.int_in_range(0..=3)? {
        0 => {
            let len = input.int_in_range(1..=70)?;
            (0..len)
                .map(|_| input.choose(DNS).copied())
                .collect::<Result<_>>()?
        }
        1 => b"Service.Namespace.svc.cluster.local".to_vec(),
        2 => Vec::new(),
        _ => input.arbitrary()?,
    })
}

impl Hello {
    fn arbitrary(input: &mut Unstructured<'_>) -> Result<Self> {
        let record_minor = input.int_in_range(0..=4)?;
        let record_size = if input.ratio(1, 4)? {
            Some(input.int_in_range(1..=300)?)
        } else {
            None
        };
        let legacy_version = input.arbitrary()?;
        let random = input.arbitrary()?;
        let session_id_len = input.int_in_range(0..=32)?;
        let session_id = input.bytes(session_id_len)?.to_vec();
        let suites = input.int_in_range(1..=40)?;
        let cipher_suites = (0..suites)
            .map(|_| input.arbitrary())
            .collect::<Result<_>>()?;
        let compression = if input.arbitrary()? {
            vec![0]
        } else {
            input.arbitrary()?
        };
        let mut extensions = Vec::new();
        for _ in 0..input.int_in_range(0..=12)? {
            let extension = match input.int_in_range(0..=3)? {
                0 => {
                    let entries = input.int_in_range(1..=3)?;
                    let entries = (0..entries)
                        .map(|_| {
                            let kind = if input.ratio(7, 8)? {
                                0
                            } else {
                                input.arbitrary()?
                            };
                            Ok((kind, name(input)?))
                        })
                        .collect::<Result<_>>()?;
                    Extension::ServerName(entries)
                }
                // GREASE (RFC 8701): 0x?a?a, empty or one byte.
                1 => {
                    let nibble = u16::from(input.int_in_range(0..=15u8)?);
                    Extension::Other {
                        kind: (nibble << 12) | 0x0a00 | (nibble << 4) | 0x0a,
                        body: input.arbitrary::<Option<u8>>()?.into_iter().collect(),
                    }
                }
                _ => Extension::Other {
                    kind: input.arbitrary()?,
                    body: input.arbitrary()?,
                },
            };
            extensions.push(extension);
        }
        let after = input.arbitrary()?;
        Ok(Self {
            record_minor,
            record_size,
            legacy_version,
            random,
            session_id,
            cipher_suites,
            compression,
            extensions,
            after,
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut hello = self.legacy_version.to_vec();
        hello.extend_from_slice(&self.random);
        put_u8_prefixed(&mut hello, &self.session_id);
        let suites: Vec<u8> = self
            .cipher_suites
            .iter()
            .flat_map(|s| s.to_be_bytes())
            .collect();
        put_u16_prefixed(&mut hello, &suites);
        put_u8_prefixed(&mut hello, &self.compression);
        let mut extensions = Vec::new();
        for extension in &self.extensions {
            let (kind, body) = extension.encode();
            extensions.extend_from_slice(&kind.to_be_bytes());
            put_u16_prefixed(&mut extensions, &body);
        }
        put_u16_prefixed(&mut hello, &extensions);
        let mut handshake = vec![1]; // client_hello
        let len = u32::try_from(hello.len()).expect("small").to_be_bytes();
        handshake.extend_from_slice(&len[1..]);
        handshake.extend_from_slice(&hello);
        let size = self.record_size.unwrap_or(usize::from(u16::MAX));
        let mut records = Vec::new();
        for fragment in handshake.chunks(size) {
            records.extend_from_slice(&[tls::HANDSHAKE, 3, self.record_minor]);
            put_u16_prefixed(&mut records, fragment);
        }
        records
    }

    /// From the structure, not the bytes: the first server_name extension decides.
    fn expected_sni(&self) -> Option<String> {
        let entries = self
            .extensions
            .iter()
            .find_map(|extension| match extension {
                Extension::ServerName(entries) => Some(Ok(entries)),
                Extension::Other { kind: 0, body } => Some(Err(body)),
                Extension::Other { .. } => None,
            })?;
        let (kind, name) = match entries {
            Ok(entries) => entries.first()?,
            // A random body under the server_name type: the reference reads it.
            Err(body) => return tls::server_name(body),
        };
        let dns = |b: &u8| b.is_ascii_alphanumeric() || b".-_".contains(b);
        (*kind == 0 && !name.is_empty() && name.iter().all(dns))
            .then(|| String::from_utf8_lossy(name).to_ascii_lowercase())
    }
}

impl Extension {
    fn encode(&self) -> (u16, Vec<u8>) {
        match self {
            Self::ServerName(entries) => {
                let mut list = Vec::new();
                for (kind, name) in entries {
                    list.push(*kind);
                    put_u16_prefixed(&mut list, name);
                }
                let mut body = Vec::new();
                put_u16_prefixed(&mut body, &list);
                (0, body)
            }
            Self::Other { kind, body } => (*kind, body.clone()),
        }
    }
}

fn put_u8_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    let bytes = &bytes[..bytes.len().min(usize::from(u8::MAX))];
    out.push(u8::try_from(bytes.len()).expect("capped"));
    out.extend_from_slice(bytes);
}

fn put_u16_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    let bytes = &bytes[..bytes.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&u16::try_from(bytes.len()).expect("capped").to_be_bytes());
    out.extend_from_slice(bytes);
}
