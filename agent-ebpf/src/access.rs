//! Context access the verifier accepts. Clang and rustc like to compute a field's address once
//! and load through it later, which the verifier refuses for context and socket pointers
//! ("dereference of modified ctx ptr"); volatile loads keep each read a single load at a fixed
//! offset from the original pointer.

use core::ptr::read_volatile;

/// Reads one field of a context or socket.
///
/// # Safety
/// `field` must point at a readable field of the program's context (or its socket).
#[inline(always)]
pub unsafe fn read_field<T: Copy>(field: *const T) -> T {
    // SAFETY: upheld by the caller.
    unsafe { read_volatile(field) }
}

/// Reads an IPv6 address field word by word.
///
/// # Safety
/// `words` must point at a readable `[u32; 4]` field of the context (or its socket).
#[inline(always)]
pub unsafe fn read_words(words: *const [u32; 4]) -> [u32; 4] {
    let first = words.cast::<u32>();
    // SAFETY: upheld by the caller.
    unsafe {
        [
            read_volatile(first),
            read_volatile(first.add(1)),
            read_volatile(first.add(2)),
            read_volatile(first.add(3)),
        ]
    }
}
