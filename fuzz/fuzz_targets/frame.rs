//! The frame decoder: any byte stream from a daemon is either split into
//! frames that lie inside the input, or refused — never a panic, never an
//! allocation beyond the 1 MiB bound.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pilot_gateway::ipc::{split_frame, FrameReader, MAX_MESSAGE};

fuzz_target!(|data: &[u8]| {
    // The pure splitter.
    let mut rest = data;
    while let Ok(Some((_, range, used))) = split_frame(rest) {
        assert!(range.end <= used && used <= rest.len() && used > 0);
        rest = &rest[used..];
    }
    // The buffered reader, fed in odd-sized pieces.
    struct Chunks<'a>(&'a [u8], usize);
    impl std::io::Read for Chunks<'_> {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            let n = b.len().min(self.0.len()).min(1 + self.1 % 97);
            self.1 = self.1.wrapping_mul(31).wrapping_add(7);
            b[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let mut r = FrameReader::new(Chunks(data, data.len()), 64);
    for _ in 0..data.len() + 1 {
        match r.read_frame() {
            Ok((_, range)) => assert!(range.end <= r.buffer().len() && range.len() < MAX_MESSAGE),
            Err(_) => break,
        }
    }
});
