//! The pilot address parser: whatever it accepts formats back to a string
//! that parses to the same address.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pilot_gateway::address::PilotAddr;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(a) = s.parse::<PilotAddr>() {
            assert_eq!(a.to_string().parse::<PilotAddr>(), Ok(a));
            assert_eq!(PilotAddr::from_wire(&a.to_wire()), Some(a));
        }
        let _ = PilotAddr::looks_like_address(s);
    }
});
