//! Deterministic byte streams for byte-exact checks: byte i of stream `seed` is
//! (i mod 251) xor seed. 251 is prime, so chunks that arrive out of order, twice or not at all
//! break the pattern.

pub fn byte_at(offset: u64, seed: u8) -> u8 {
    (offset % 251) as u8 ^ seed
}

/// Fills `buf` with the stream's bytes from `offset`.
pub fn fill(buf: &mut [u8], offset: u64, seed: u8) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = byte_at(offset + i as u64, seed);
    }
}

/// Checks `buf` against the stream from `offset`; returns the first bad offset.
pub fn check(buf: &[u8], offset: u64, seed: u8) -> Result<(), u64> {
    match buf
        .iter()
        .enumerate()
        .find(|(i, byte)| **byte != byte_at(offset + *i as u64, seed))
    {
        Some((i, _)) => Err(offset + i as u64),
        None => Ok(()),
    }
}

/// Writes `len` bytes of the stream to `writer`.
pub fn write_stream(writer: &mut impl std::io::Write, len: u64, seed: u8) -> std::io::Result<()> {
    write_stream_from(writer, 0, len, seed)
}

/// Writes `len` bytes of the stream, starting at byte `start`, to `writer`.
pub fn write_stream_from(
    writer: &mut impl std::io::Write,
    start: u64,
    len: u64,
    seed: u8,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < len {
        let chunk = (len - sent).min(buf.len() as u64) as usize;
        fill(&mut buf[..chunk], start + sent, seed);
        writer.write_all(&buf[..chunk])?;
        sent += chunk as u64;
    }
    Ok(())
}

/// Reads to EOF, checking the stream; returns the byte count or an error naming the offset.
pub fn read_stream(reader: &mut impl std::io::Read, seed: u8) -> std::io::Result<u64> {
    read_stream_from(reader, 0, seed)
}

/// Reads to EOF, checking the stream from byte `start`; returns the bytes read.
pub fn read_stream_from(
    reader: &mut impl std::io::Read,
    start: u64,
    seed: u8,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(received);
        }
        check(&buf[..n], start + received, seed).map_err(|offset| {
            std::io::Error::other(format!("stream {seed} corrupt at byte {offset}"))
        })?;
        received += n as u64;
    }
}
