//! The state-file reader: JSON parsing and the state schema. Anything it
//! accepts serialises and reads back to the same state.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pilot_gateway::json;
use pilot_gateway::state::State;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = json::parse_bytes(data) {
        assert_eq!(json::parse(&v.to_string()).as_ref(), Ok(&v));
        if let Ok(s) = State::from_json(&v) {
            let again = State::from_json(&json::parse(&s.to_json().to_string()).unwrap()).unwrap();
            assert_eq!(again, s);
        }
    }
});
