//! Decodes the input as length-delimited `wirefence.v1.Update`s and feeds them to a
//! `Tracker`, checking its invariants (see `wirefence_fuzz::check_updates`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    wirefence_fuzz::check_updates(data);
});
