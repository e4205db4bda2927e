//! `make static` (issue 21): every shipped static binary is statically
//! linked, stripped and under 1 MiB. Builds them first (scripts/static.sh;
//! cargo rebuilds only what changed).

mod common;

use common::static_binary;

/// The targets `make static` ships.
const TARGETS: [&str; 2] = ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"];
const LIMIT: u64 = 1 << 20;

/// The program header types of an ELF64 little-endian file.
fn program_headers(elf: &[u8]) -> Vec<u32> {
    assert_eq!(&elf[..6], b"\x7fELF\x02\x01", "not a 64-bit little-endian ELF");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count)
        .map(|i| u32::from_le_bytes(elf[phoff + i * size..][..4].try_into().unwrap()))
        .collect()
}

#[test]
fn every_static_binary_is_static_stripped_and_under_one_mib() {
    for t in TARGETS {
        let bin = static_binary(t);
        let elf = std::fs::read(&bin).unwrap();
        let size = elf.len() as u64;
        eprintln!(
            "{} {size} bytes ({} KiB under 1 MiB)",
            bin.display(),
            (LIMIT - size.min(LIMIT)) / 1024
        );
        assert!(size < LIMIT, "{}: {size} bytes, over 1 MiB", bin.display());
        let phdrs = program_headers(&elf);
        const PT_INTERP: u32 = 3;
        const PT_DYNAMIC: u32 = 2;
        assert!(
            !phdrs.contains(&PT_INTERP) && !phdrs.contains(&PT_DYNAMIC),
            "{}: dynamically linked ({phdrs:?})",
            bin.display()
        );
        // Stripped: no symbol table section name left in the file.
        assert!(
            !elf.windows(8).any(|w| w == b".symtab\0"),
            "{}: not stripped",
            bin.display()
        );
    }
}
